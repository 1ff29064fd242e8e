//! Embeds the exact source of the plughost-api this host is built with (the files its package
//! publishes), so that `plughost new` and `plughost api-source` can lay it down on a machine that has
//! no checkout of this repository. No path of the build machine ends up in the binary's output.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn collect(dir: &Path, rel: &str, out: &mut Vec<(String, PathBuf)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("plugin-api source {}: {e}", dir.display()))
        .map(|e| e.expect("a readable directory entry in plugin-api/src"))
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().into_string().expect("plugin-api file names are UTF-8");
        let path = e.path();
        let rel = format!("{rel}/{name}");
        if path.is_dir() {
            collect(&path, &rel, out);
        } else if name.ends_with(".rs") {
            out.push((rel, path));
        }
    }
}

fn main() {
    let api = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-api");
    println!("cargo::rerun-if-changed={}", api.display());
    // The same files as plugin-api's `include` (its published package).
    let mut files: Vec<(String, PathBuf)> = ["Cargo.toml", "README.md", "CHANGELOG.md", "RELEASES"]
        .iter()
        .map(|f| ((*f).to_owned(), api.join(f)))
        .collect();
    collect(&api.join("src"), "src", &mut files);
    let mut code = String::from("/// The plughost-api package source: (path inside the package, contents).\n");
    code.push_str("pub(super) const FILES: &[(&str, &[u8])] = &[\n");
    for (rel, path) in &files {
        let abs = path.canonicalize().unwrap_or_else(|e| panic!("plugin-api source {}: {e}", path.display()));
        writeln!(code, "    ({rel:?}, include_bytes!({:?})),", abs.display().to_string()).expect("writing to a String");
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("api_source.rs");
    std::fs::write(&out, code).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    commit();
    // The plughost-api version, for `--version` (the first `version =` of its manifest is its package's).
    let manifest = std::fs::read_to_string(api.join("Cargo.toml")).expect("plugin-api/Cargo.toml is readable");
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("plugin-api/Cargo.toml has a version");
    println!("cargo::rustc-env=PLUGHOST_API_VERSION={version}");
}

/// `PLUGHOST_COMMIT`: the commit this is built from (`unknown` outside a git checkout), for `--version`.
fn commit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    println!("cargo::rustc-env=PLUGHOST_COMMIT={commit}{}", if dirty { "-dirty" } else { "" });
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo::rerun-if-changed={dir}/HEAD");
        println!("cargo::rerun-if-changed={dir}/index");
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo::rerun-if-changed={dir}/{r}");
        }
    }
}
