//! `plughost new NAME --kind volume|compute|network`: a new out-of-tree driver crate that builds, passes its own
//! `cargo test` (the conformance suite) and `plughost check` as generated, on any machine.
//! `plughost api-source DIR`: the exact plughost-api source this binary was built with.
//!
//! The crate depends on `plughost-api = "MAJOR.MINOR"` (this host's API version), as it will once the
//! package is on crates.io, and patches it to `vendor/plughost-api`, the source carried in this binary
//! (embedded at build time by `build.rs`). No path of the build machine is written anywhere: deleting
//! the `[patch.crates-io]` lines is the only change once the package is published.

use std::path::{Path, PathBuf};

mod api {
    include!(concat!(env!("OUT_DIR"), "/api_source.rs"));
}

/// `MAJOR.MINOR` of the plughost-api this binary carries.
fn api_requirement() -> String {
    let mut v = plughost_api::API_VERSION.split('.');
    format!("{}.{}", v.next().unwrap_or("1"), v.next().unwrap_or("0"))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn is_empty_or_absent(dir: &Path) -> bool {
    dir.read_dir().map(|mut d| d.next().is_none()).unwrap_or(true)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create \"{}\": {e}", d.display()))?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("cannot write \"{}\": {e}", path.display()))
}

/// Writes the plughost-api package source carried in this binary into `dir` (absent or empty).
pub fn api_source(dir: &Path) -> Result<(), String> {
    if !is_empty_or_absent(dir) {
        return Err(format!("\"{}\" exists and is not empty", dir.display()));
    }
    for (rel, bytes) in api::FILES {
        write_file(&dir.join(rel), bytes)?;
    }
    Ok(())
}

/// A kind's driver template: its `src/lib.rs` and `tests/conformance.rs`, what its resources are called,
/// and another kind (the one the generated README turns off).
struct Template {
    kind: &'static str,
    lib: &'static str,
    test: &'static str,
    things: &'static str,
    other: &'static str,
}

/// One template per driver kind (a test checks that every kind has one).
const TEMPLATES: &[Template] = &[
    Template {
        kind: "volume",
        lib: include_str!("../../templates/new/volume_lib.rs.tmpl"),
        test: include_str!("../../templates/new/volume_test.rs.tmpl"),
        things: "volumes",
        other: "compute",
    },
    Template {
        kind: "compute",
        lib: include_str!("../../templates/new/compute_lib.rs.tmpl"),
        test: include_str!("../../templates/new/compute_test.rs.tmpl"),
        things: "instances",
        other: "volume",
    },
    Template {
        kind: "network",
        lib: include_str!("../../templates/new/network_lib.rs.tmpl"),
        test: include_str!("../../templates/new/network_test.rs.tmpl"),
        things: "networks and ports",
        other: "compute",
    },
];

/// Whether `plughost new` has a template for `kind`.
pub fn has_template(kind: &str) -> bool {
    TEMPLATES.iter().any(|t| t.kind == kind)
}

/// The kinds `plughost new --kind` takes.
pub fn template_kinds() -> Vec<&'static str> {
    TEMPLATES.iter().map(|t| t.kind).collect()
}

/// Creates `parent/NAME` holding a driver crate of `kind`; returns its directory.
pub fn new_driver(name: &str, kind: &str, parent: &Path) -> Result<PathBuf, String> {
    if !valid_name(name) {
        return Err(format!("driver name {name:?}: use 1-64 of a-z 0-9 - _, starting with a letter"));
    }
    let Some(t) = TEMPLATES.iter().find(|t| t.kind == kind) else {
        let kinds: Vec<&str> = TEMPLATES.iter().map(|t| t.kind).collect();
        return Err(format!("--kind {kind:?}: expected one of {}", kinds.join(", ")));
    };
    let (lib_rs, test_rs, things, other) = (t.lib, t.test, t.things, t.other);
    let dir = parent.join(name);
    if !is_empty_or_absent(&dir) {
        return Err(format!("\"{}\" exists and is not empty", dir.display()));
    }
    let lib = name.replace('-', "_");
    let api = api_requirement();
    let fill = |t: &str| {
        t.replace("{{name}}", name)
            .replace("{{lib}}", &lib)
            .replace("{{kind}}", kind)
            .replace("{{other}}", other)
            .replace("{{things}}", things)
            .replace("{{api}}", &api)
            .replace("{{api_full}}", plughost_api::API_VERSION)
    };
    let write = |rel: &str, text: String| write_file(&dir.join(rel), text.as_bytes());
    write("Cargo.toml", fill(include_str!("../../templates/new/Cargo.toml.tmpl")))?;
    write("README.md", fill(include_str!("../../templates/new/README.md.tmpl")))?;
    write("src/lib.rs", fill(lib_rs))?;
    write("tests/conformance.rs", fill(test_rs))?;
    write(".gitignore", "/target\n".to_owned())?;
    api_source(&dir.join("vendor/plughost-api"))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_carried_source_is_this_plughost_api() {
        let manifest = api::FILES.iter().find(|(p, _)| *p == "Cargo.toml").expect("Cargo.toml is carried").1;
        let manifest = std::str::from_utf8(manifest).expect("UTF-8 manifest");
        assert!(manifest.contains(&format!("version = \"{}\"", plughost_api::API_VERSION)), "{manifest}");
        assert!(!manifest.contains(".workspace = true") && !manifest.contains("workspace = true"), "{manifest}");
        for f in ["src/lib.rs", "src/testing.rs", "src/options.rs", "README.md", "CHANGELOG.md", "RELEASES"] {
            assert!(api::FILES.iter().any(|(p, _)| *p == f), "{f} is not carried");
        }
    }
}
