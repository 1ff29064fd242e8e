//! The client side of the control socket: one request, one answer, printed for people or scripts.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

use crate::drivers::table;

/// Sends one request and returns the answer object.
pub fn request(socket: &Path, req: &Value) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to \"{}\": {e} (is plughost run serving there?)", socket.display()))?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(|e| format!("socket \"{}\": write failed: {e}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(&s)
        .read_line(&mut answer)
        .map_err(|e| format!("socket \"{}\": read failed: {e}", socket.display()))?;
    serde_json::from_str(&answer).map_err(|e| format!("socket \"{}\": malformed answer: {e}", socket.display()))
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(other) => other.to_string(),
    }
}

/// Formats a successful result for people.
pub fn format_human(service: &str, op: &str, result: &Value) -> String {
    match (service, op) {
        ("", "status") => {
            let mut out = format!("plughost pid {} on {}\n", s(result, "pid"), s(result, "socket"));
            for svc in result["services"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "service {}: {}{} (heartbeat {} ms ago)\n",
                    s(svc, "name"),
                    s(svc, "state"),
                    svc.get("reason").and_then(Value::as_str).map(|r| format!(" ({r})")).unwrap_or_default(),
                    s(svc, "heartbeat_age_ms")
                ));
                let rows: Vec<[String; 7]> = svc["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        let calls: u64 = b["calls"]
                            .as_object()
                            .map(|c| c.values().filter_map(|x| x["count"].as_u64()).sum())
                            .unwrap_or(0);
                        [
                            format!("{}{}", s(b, "name"), if b["default"] == true { "*" } else { "" }),
                            s(b, "state"),
                            format!("{} {}", s(&b["driver"], "name"), s(&b["driver"], "version")),
                            s(&b["driver"], "digest").chars().take(19).collect(),
                            s(&b["driver"], "generation"),
                            calls.to_string(),
                            s(&b["driver"], "path"),
                        ]
                    })
                    .collect();
                let header = ["  BACKEND", "STATE", "DRIVER", "DIGEST", "GEN", "CALLS", "PATH"].map(String::from);
                let rows: Vec<[String; 7]> = rows
                    .into_iter()
                    .map(|mut r| {
                        r[0] = format!("  {}", r[0]);
                        r
                    })
                    .collect();
                out.push_str(&table(std::iter::once(&header).chain(rows.iter()), ""));
            }
            let libs = &result["libraries"];
            out.push_str(&format!(
                "libraries mapped: {} ({}), of which not in use (swapped out or refused) but still mapped: {} ({})\n",
                s(libs, "mapped"),
                human_size(libs["mapped_bytes"].as_u64().unwrap_or(0)),
                s(libs, "retired"),
                human_size(libs["retired_bytes"].as_u64().unwrap_or(0)),
            ));
            out
        }
        ("", "reload") => result
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let detail = r
                    .get("error")
                    .or(r.get("reason"))
                    .and_then(Value::as_str)
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default();
                format!("{}/{}: {}{detail}\n", s(r, "service"), s(r, "backend"), s(r, "outcome"))
            })
            .collect(),
        ("volume" | "compute", "swap") => format!(
            "{}: {} {} [{}] -> {} {} [{}], generation {}\n",
            s(result, "backend"),
            s(&result["old"], "name"),
            s(&result["old"], "version"),
            s(&result["old"], "digest"),
            s(&result["new"], "name"),
            s(&result["new"], "version"),
            s(&result["new"], "digest"),
            s(result, "generation")
        ),
        ("volume", "list") => {
            let rows: Vec<[String; 6]> = result
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| {
                    [
                        s(v, "name"),
                        s(v, "backend"),
                        s(v, "status"),
                        human_size(v["size"].as_u64().unwrap_or(0)),
                        human_size(v["allocated"].as_u64().unwrap_or(0)),
                        s(v, "location"),
                    ]
                })
                .collect();
            let header = ["NAME", "BACKEND", "STATUS", "SIZE", "ALLOCATED", "LOCATION"].map(String::from);
            table(std::iter::once(&header).chain(rows.iter()), "")
        }
        ("compute", "list") => {
            let rows: Vec<[String; 7]> = result
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| {
                    [
                        s(i, "name"),
                        s(i, "backend"),
                        s(i, "status"),
                        s(i, "pid"),
                        human_size(i["rss_bytes"].as_u64().unwrap_or(0)),
                        format!("{}ms", i["cpu_time_ms"].as_u64().unwrap_or(0)),
                        s(i, "command"),
                    ]
                })
                .collect();
            let header = ["NAME", "BACKEND", "STATUS", "PID", "RSS", "CPU", "COMMAND"].map(String::from);
            table(std::iter::once(&header).chain(rows.iter()), "")
        }
        _ => match result.as_object() {
            Some(m) => m
                .iter()
                .map(|(k, v)| format!("{k}: {}\n", v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())))
                .collect(),
            None => format!("{result}\n"),
        },
    }
}
