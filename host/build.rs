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
}
