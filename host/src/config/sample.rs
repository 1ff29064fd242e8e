//! `plughost config sample`: a commented TOML configuration generated from drivers' option schemas.
//! Every option line is valid TOML once uncommented: defaults as typed values, options without one as
//! a placeholder of the right type, marked `required` where the driver says so.

use plughost_api::OptionType;

use crate::loading::loader::DriverMeta;
use crate::loading::loader::OptionDescription;

/// An option type by its name (as a child described it).
fn option_type(name: &str) -> OptionType {
    [OptionType::STRING, OptionType::INTEGER, OptionType::BOOL, OptionType::SIZE, OptionType::PATH]
        .into_iter()
        .find(|t| t.as_str() == name)
        .unwrap_or(OptionType::STRING)
}

/// A TOML value for an option's default, as the user would write it.
fn toml_value(ty: OptionType, text: &str) -> String {
    match ty {
        OptionType::INTEGER | OptionType::BOOL if !text.is_empty() => {
            plughost_api::host::normalize_value(ty, text).unwrap_or_else(|_| format!("{text:?}"))
        }
        _ => format!("{text:?}"),
    }
}

/// A placeholder of the right type for an option without a default.
fn placeholder(ty: OptionType) -> &'static str {
    match ty {
        OptionType::INTEGER => "0",
        OptionType::BOOL => "false",
        OptionType::SIZE => "\"10GiB\"",
        OptionType::PATH => "\"/path\"",
        _ => "\"...\"",
    }
}

fn option_lines(o: &OptionDescription, out: &mut String) {
    let ty = option_type(&o.ty);
    let mut flags = vec![o.ty.clone()];
    if o.required {
        flags.push("required".to_owned());
    }
    if o.secret {
        flags.push("secret: never logged or shown".to_owned());
    }
    out.push_str(&format!("# {} ({})\n", o.help, flags.join(", ")));
    match &o.default {
        Some(v) if !o.secret => out.push_str(&format!("# {} = {}\n", o.name, toml_value(ty, v))),
        _ => out.push_str(&format!("# {} = {}\n", o.name, placeholder(ty))),
    }
}

/// The sample configuration for these drivers.
pub fn sample(drivers: &[DriverMeta]) -> String {
    let mut out = String::from(
        "# plughost sample configuration, generated from the drivers' option schemas.\n\
         # Precedence: command line > environment (PLUGHOST_*) > this file > defaults.\n\n\
         # state_dir = \"/var/lib/plughost\"\n# socket = \"/var/lib/plughost/plughost.sock\"\n\
         # driver_dirs = [\"/usr/lib/plughost/drivers\"]\n# shutdown_timeout_ms = 10000\n\
         # periodic_interval_ms = 10000\n# max_request_bytes = 1048576\n# max_connections = 512\n# max_driver_bytes = 268435456\n\
         # Members of this group may read through the socket (status, get, list, stats)\n\
         # socket_group = \"plughost\"\n\
         # Serve GET /metrics and /healthz over HTTP (nothing listens on TCP unless set)\n\
         # metrics_listen = \"127.0.0.1:9464\"\n\n\
         # Which driver code may load (see plughost inspect for the digest of a library)\n\
         [trust]\n\
         # Refuse driver files that anyone but root or plughost's user could have written\n\
         # strict = true\n\
         # A file of allowed digests, one blake3:HEX per line\n\
         # allowlist = \"/etc/plughost/allowlist\"\n\
         # Refuse backends that pin no digest (digest = \"blake3:...\" next to driver)\n\
         # require_pins = false\n\
         # Let swap name a driver file outside the driver directories\n\
         # allow_swap_paths = false\n\n\
         # Join a fleet over a NATS broker (off unless url is set; see docs/fleet.md)\n\
         [fleet]\n\
         # url = [\"tls://nats1.example:4222\", \"tls://nats2.example:4222\"]\n\
         # name = \"default\"\n\
         # This host's name: A-Z a-z 0-9 _ - (default: the hostname, dots turned into -)\n\
         # host = \"h1\"\n\
         # user:password, an nkey seed or a .creds file; mode 0600, owned by root or plughost's user\n\
         # credentials = \"/etc/plughost/fleet.creds\"\n\
         # report_interval = \"10s\"\n\
         # A host whose last report is older is down (more than twice report_interval)\n\
         # service_down_time = \"60s\"\n\
         # request_workers = 8\n\
         # Allow a nats:// URL off this machine without TLS\n\
         # allow_plaintext = false\n\
         # [fleet.labels]\n\
         # disk = \"ssd\"\n",
    );
    let mut seen_kinds: Vec<&str> = Vec::new();
    for lib in drivers {
        // The first driver of a kind is the service's default backend; each further one is a backend
        // of its own, named after the driver (two `[volume]` tables would not be TOML).
        let first = !seen_kinds.contains(&lib.kind.as_str());
        seen_kinds.push(&lib.kind);
        let (table, options) = if first {
            (format!("[{}]", lib.kind), format!("[{}.options]", lib.kind))
        } else {
            (format!("[[{}.backends]]\nname = {:?}", lib.kind, lib.name), format!("[{}.backends.options]", lib.kind))
        };
        out.push_str(&format!(
            "\n# {} {}: {}\n{table}\ndriver = {:?}\n# Pin this backend to one build of its driver\n# digest = \"blake3:...\"\n",
            lib.name, lib.version, lib.summary, lib.name,
        ));
        out.push_str(
            "# Where the driver runs: \"in-process\" (fastest) or \"process\" (a worker: its faults cannot take\n\
             # plughost down). For an isolated backend: the worker's user and group, address-space limit, and\n\
             # how long one call may take before it is answered timeout and the worker restarted\n\
             # isolation = \"in-process\"\n# user = \"nobody\"\n# group = \"nogroup\"\n# memory_limit = \"1GiB\"\n# call_timeout = \"60s\"\n# max_frame_bytes = \"16MiB\"\n# max_records = 1000000\n",
        );
        let kind = crate::services::kinds::kind(&lib.kind);
        if kind.is_some_and(|k| k.settings.contains(&"stop_instances_on_exit")) {
            out.push_str(
                "# Stop this service's instances when plughost stops (host setting; by default they keep\n\
                 # running and the next start re-adopts them)\n# stop_instances_on_exit = false\n",
            );
        }
        out.push_str(&format!("{options}\n"));
        for o in &lib.options {
            option_lines(o, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use plughost_api::OptionSpec;

    #[test]
    fn every_option_line_is_valid_toml_once_uncommented() {
        const SCHEMA: &[OptionSpec] = &[
            OptionSpec::path("root", "where").required(),
            OptionSpec::size("max", "largest").default("1GiB"),
            OptionSpec::boolean("sync", "fsync").default("yes"),
            OptionSpec::integer("n", "count"),
            OptionSpec::string("token", "secret").secret().default("hunter2"),
        ];
        let mut out = String::new();
        for o in SCHEMA {
            option_lines(&OptionDescription::of(o), &mut out);
        }
        assert!(!out.contains("hunter2"), "{out}");
        let uncommented: String =
            out.lines().filter(|l| l.contains(" = ")).map(|l| format!("{}\n", l.trim_start_matches("# "))).collect();
        let table: toml::Table = toml::from_str(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert_eq!(table["sync"].as_bool(), Some(true));
        assert_eq!(table["n"].as_integer(), Some(0));
        assert_eq!(table["max"].as_str(), Some("1GiB"));
        assert!(out.contains("(path, required)"), "{out}");
    }
}
