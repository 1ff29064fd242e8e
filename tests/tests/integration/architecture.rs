//! The host's module structure: no import cycle among its modules (each file is a module; a module's
//! unit tests, after `#[cfg(test)]`, may use anything). An edge is any path that names another module:
//! `crate::a::b`, `super::x`, `self::x`, or a child module named from its parent (`volume::KIND` in
//! `services/mod.rs`). Items are named by their module, not through the crate root's re-exports, so
//! that the root is never part of a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module of the host library, by its path below `host/src` without `.rs` (`services/volume`;
/// `services/mod.rs` is `services`).
type Module = String;

fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<Module, PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, src, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p.strip_prefix(src).unwrap().with_extension("");
                let rel = rel.to_str().unwrap().to_owned();
                let name = match rel.as_str() {
                    "lib" | "main" => continue,
                    r => r.strip_suffix("/mod").unwrap_or(r).to_owned(),
                };
                out.insert(name, p);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// The code of a module that counts: comment lines and its unit tests left out.
fn code(path: &Path) -> Vec<(usize, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        if line.trim_start().starts_with("//") {
            continue;
        }
        out.push((i + 1, line.to_owned()));
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths written after `prefix::` in `text` (each a list of segments); a `{...}` group gives one
/// path per element.
fn paths_after(text: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let needle = format!("{prefix}::");
    let mut from = 0;
    while let Some(pos) = text[from..].find(&needle) {
        let start = from + pos;
        from = start + needle.len();
        // A whole word only: not `my_crate::`, not `a::crate::`.
        let before = text[..start].chars().next_back();
        if before.is_some_and(|c| is_ident(c) || c == ':') {
            continue;
        }
        out.extend(expand(&text[from..]));
    }
    out
}

/// The path segments at the start of `rest` (after a `::`), expanding one level of `{a, b::c}`.
fn expand(rest: &str) -> Vec<Vec<String>> {
    let segs = segments(rest);
    let consumed: usize = segs.iter().map(|s| s.len() + 2).sum();
    let after = rest.get(consumed..).unwrap_or("");
    if after.starts_with('{') || (segs.is_empty() && rest.starts_with('{')) {
        let body = if segs.is_empty() { rest } else { after };
        let mut depth = 0;
        let mut end = body.len();
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let inner = &body[1..end];
        let mut parts = Vec::new();
        let (mut depth, mut last) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&inner[last..i]);
                    last = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&inner[last..]);
        return parts
            .into_iter()
            .map(|p| {
                let mut full = segs.clone();
                full.extend(segments_plain(p.trim()));
                full
            })
            .collect();
    }
    vec![segs]
}

/// `a::b::c` at the start of `rest`, stopping before a `{` or anything that is not a path.
fn segments(rest: &str) -> Vec<String> {
    let mut segs = Vec::new();
    let mut s = rest;
    loop {
        let len = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
        if len == 0 {
            break;
        }
        segs.push(s[..len].to_owned());
        match s[len..].strip_prefix("::") {
            Some(r) if !r.starts_with('{') => s = r,
            _ => break,
        }
    }
    segs
}

fn segments_plain(p: &str) -> Vec<String> {
    p.split("::").map(|s| s.trim().split(|c: char| !is_ident(c)).next().unwrap_or("").to_owned()).collect()
}

/// The longest module that `base` + `segs` names, if any.
fn resolve(mods: &BTreeMap<Module, PathBuf>, base: &str, segs: &[String]) -> Option<Module> {
    let mut best = None;
    let mut path = base.to_owned();
    for s in segs {
        if s.is_empty() || s == "self" {
            break;
        }
        path = if path.is_empty() { s.clone() } else { format!("{path}/{s}") };
        if mods.contains_key(&path) {
            best = Some(path.clone());
        } else {
            break;
        }
    }
    best
}

fn parent(m: &str) -> &str {
    m.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

/// The import graph: each module's targets.
type Graph = BTreeMap<Module, BTreeSet<Module>>;
/// Where each edge was written (the first place).
type Evidence = BTreeMap<(Module, Module), String>;

/// Every edge of the graph, with where it was written; and the paths that go through the crate root.
fn edges(mods: &BTreeMap<Module, PathBuf>) -> (Graph, Evidence, Vec<String>) {
    let mut graph: Graph = mods.keys().map(|m| (m.clone(), BTreeSet::new())).collect();
    let mut evidence = BTreeMap::new();
    let mut through_root = Vec::new();
    for (m, path) in mods {
        let children: Vec<&str> = mods
            .keys()
            .filter(|c| parent(c) == m.as_str() && c.as_str() != m.as_str())
            .map(|c| c.rsplit('/').next().unwrap())
            .collect();
        for (line_no, line) in code(path) {
            let mut targets: Vec<(Option<Module>, Vec<String>, &str)> = Vec::new();
            for segs in paths_after(&line, "crate") {
                targets.push((resolve(mods, "", &segs), segs, "crate"));
            }
            for segs in paths_after(&line, "super") {
                let mut base = parent(m).to_owned();
                let mut segs = segs;
                while segs.first().is_some_and(|s| s == "super") {
                    base = parent(&base).to_owned();
                    segs.remove(0);
                }
                let target = resolve(mods, &base, &segs).or_else(|| (!base.is_empty()).then(|| base.clone()));
                targets.push((target, segs, "super"));
            }
            for segs in paths_after(&line, "self") {
                targets.push((resolve(mods, m, &segs), segs, "self"));
            }
            for child in &children {
                for segs in paths_after(&line, child) {
                    let mut full = vec![(*child).to_owned()];
                    full.extend(segs);
                    targets.push((resolve(mods, m, &full), full, "child"));
                }
            }
            for (target, segs, how) in targets {
                match target {
                    Some(t) if &t != m => {
                        evidence
                            .entry((m.clone(), t.clone()))
                            .or_insert_with(|| format!("{}:{line_no}: {}", path.display(), line.trim()));
                        graph.get_mut(m).unwrap().insert(t);
                    }
                    Some(_) => {}
                    None if how == "crate" && !segs.is_empty() => through_root.push(format!(
                        "{}:{line_no}: crate::{} names no module: name items by their module",
                        path.display(),
                        segs.join("::")
                    )),
                    None => {}
                }
            }
        }
    }
    (graph, evidence, through_root)
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<Module>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in &s.graph[v] {
            if !s.index.contains_key(w.as_str()) {
                visit(s, w);
                let lw = s.low[w.as_str()];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w.as_str()) {
                let iw = s.index[w.as_str()];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn src() -> PathBuf {
    plughost_tests::workspace_root().join("host/src")
}

#[test]
fn the_host_has_no_import_cycle() {
    let mods = modules(&src());
    assert!(mods.len() > 10, "found only {mods:?}");
    let (graph, evidence, through_root) = edges(&mods);
    assert!(through_root.is_empty(), "paths through the crate root:\n{}", through_root.join("\n"));
    let found = cycles(&graph);
    let mut report = String::new();
    for comp in &found {
        report.push_str(&format!("cycle among {} modules: {}\n", comp.len(), comp.join(", ")));
        for a in comp {
            for b in &graph[a] {
                if comp.contains(b) {
                    report.push_str(&format!("  {a} -> {b}  ({})\n", evidence[&(a.clone(), b.clone())]));
                }
            }
        }
    }
    assert!(found.is_empty(), "{report}");
}

#[test]
fn the_cycle_check_finds_cycles() {
    // The check itself, on a small tree made for it: a -> b -> c -> a, d alone, a child named from its
    // parent, and a unit test that would close another cycle (not counted).
    let dir = plughost_tests::TempDir::new("architecture");
    let write = |rel: &str, text: &str| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write("lib.rs", "pub mod a;\npub mod b;\npub mod c;\npub mod d;\npub mod p;\n");
    write("a.rs", "use crate::b::Thing;\n// crate::d::Not in a comment\n");
    write("b.rs", "use crate::{c::{self, Other}, d};\n");
    write("c.rs", "pub fn f() { super::a::g() }\n#[cfg(test)]\nmod tests { use crate::d::X; }\n");
    write("d.rs", "#[cfg(test)]\nmod tests { use crate::a::X; }\n");
    write("p/mod.rs", "pub mod q;\npub static K: u8 = q::K;\n");
    write("p/q.rs", "pub static K: u8 = super::K;\n");
    let mods = modules(dir.path());
    let (graph, _, through_root) = edges(&mods);
    assert!(through_root.is_empty(), "{through_root:?}");
    assert_eq!(graph["a"], BTreeSet::from(["b".to_owned()]));
    assert_eq!(graph["b"], BTreeSet::from(["c".to_owned(), "d".to_owned()]));
    assert_eq!(graph["d"], BTreeSet::new());
    assert_eq!(
        cycles(&graph),
        vec![vec!["a".to_owned(), "b".to_owned(), "c".to_owned()], vec!["p".to_owned(), "p/q".to_owned()]]
    );
    write("e.rs", "use crate::Loader;\n");
    let (_, _, through_root) = edges(&modules(dir.path()));
    assert_eq!(through_root.len(), 1, "{through_root:?}");
}
