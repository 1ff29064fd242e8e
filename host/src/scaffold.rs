//! `plughost new NAME --kind volume|compute`: a new out-of-tree driver crate that builds, passes its own
//! `cargo test` (the conformance suite) and `plughost check` as generated.

use std::path::{Path, PathBuf};

/// What a new crate's `Cargo.toml` names as plughost-api: the checkout this binary was built from, if it
/// is still there, else the released version.
fn dependency() -> (String, String) {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api");
    match checkout.join("Cargo.toml").exists().then(|| checkout.canonicalize().ok()).flatten() {
        Some(path) => {
            let p = path.display().to_string();
            (format!("{{ path = {p:?} }}"), format!("{{ path = {p:?}, features = [\"testing\"] }}"))
        }
        None => {
            let mut v = plughost_api::API_VERSION.split('.');
            let version = format!("{}.{}", v.next().unwrap_or("1"), v.next().unwrap_or("0"));
            (format!("{version:?}"), format!("{{ version = {version:?}, features = [\"testing\"] }}"))
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Creates `parent/NAME` holding a driver crate of `kind`; returns its directory.
pub fn new_driver(name: &str, kind: &str, parent: &Path) -> Result<PathBuf, String> {
    if !valid_name(name) {
        return Err(format!("driver name {name:?}: use 1-64 of a-z 0-9 - _, starting with a letter"));
    }
    let (lib_rs, test_rs, things) = match kind {
        "volume" => (
            include_str!("../templates/new/volume_lib.rs.tmpl"),
            include_str!("../templates/new/volume_test.rs.tmpl"),
            "volumes",
        ),
        "compute" => (
            include_str!("../templates/new/compute_lib.rs.tmpl"),
            include_str!("../templates/new/compute_test.rs.tmpl"),
            "instances",
        ),
        other => return Err(format!("--kind {other:?}: expected volume or compute")),
    };
    let dir = parent.join(name);
    if dir.read_dir().map(|mut d| d.next().is_some()).unwrap_or(false) {
        return Err(format!("\"{}\" exists and is not empty", dir.display()));
    }
    let (dependency, dev_dependency) = dependency();
    let lib = name.replace('-', "_");
    let fill = |t: &str| {
        t.replace("{{name}}", name)
            .replace("{{lib}}", &lib)
            .replace("{{kind}}", kind)
            .replace("{{things}}", things)
            .replace("{{dependency}}", &dependency)
            .replace("{{dev_dependency}}", &dev_dependency)
    };
    let write = |rel: &str, text: String| -> Result<(), String> {
        let p = dir.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("cannot create \"{}\": {e}", d.display()))?;
        }
        std::fs::write(&p, text).map_err(|e| format!("cannot write \"{}\": {e}", p.display()))
    };
    write("Cargo.toml", fill(include_str!("../templates/new/Cargo.toml.tmpl")))?;
    write("README.md", fill(include_str!("../templates/new/README.md.tmpl")))?;
    write("src/lib.rs", fill(lib_rs))?;
    write("tests/conformance.rs", fill(test_rs))?;
    write(".gitignore", "/target\n".to_owned())?;
    Ok(dir)
}
