//! Deliberately broken driver libraries, built or made from real ones on the spot.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{cargo, driver, profile_dir, target_dir, workspace_root};

/// Drivers compiled against altered copies of plugin-api.
#[derive(Debug)]
pub struct Built {
    /// fake-volume built against a plugin-api of the same version whose `extend` takes a `u32` size.
    pub changed_signature: PathBuf,
    /// fake-volume built against plugin-api 2.0.0.
    pub api_v2: PathBuf,
    /// fake-volume built against a copy of plugin-api one minor version newer than this one, with no
    /// interface change (see `tests/tests/integration/compat.rs` for real releases with real changes).
    pub api_v1_1: PathBuf,
    /// A driver whose metadata is invalid (bad name, bad option default), against the real plugin-api.
    pub bad_metadata: PathBuf,
    /// A second build of file-volume (version `1.0.1-b`): same behaviour, different content.
    pub file_volume_b: PathBuf,
    /// A third build of file-volume (version `1.0.2-sickly`): its health check passes once (the swap's),
    /// then fails every time: a driver that goes bad after it was swapped in.
    pub file_volume_sickly: PathBuf,
    /// A fourth build of file-volume (version `1.0.3-picky`): its `init` fails when the volume root holds
    /// a file `.old-layout`, so that a swap to it fails on the hosts an operator marks so.
    pub file_volume_picky: PathBuf,
    /// A fifth build of file-volume (version `1.0.4-flaky`): healthy, but every `get` fails with an
    /// internal error (a fault of the driver, as a rollout's error rate counts).
    pub file_volume_flaky: PathBuf,
    /// faulty, with `panic_new` defaulting to true: its constructor panics under default options.
    pub faulty_panics: PathBuf,
    /// faulty whose `init` segfaults under default options (`crash = "segv"`, `crash_on = "init"`):
    /// load it isolated only.
    pub faulty_segv_init: PathBuf,
    /// fake-volume with two contract violations: it accepts a shrink, and its stats count one volume too
    /// many. The conformance suite must fail exactly `shrink_is_invalid_argument` and `stats_match_list`.
    pub sloppy_volume: PathBuf,
    /// Where an author's crate with `crate-type = ["rlib"]` only expected its driver: no `.so`, only the
    /// `.rlib` beside it.
    pub rlib_only: PathBuf,
    /// A Rust cdylib depending on plughost-api whose author forgot `export_driver!`.
    pub no_export: PathBuf,
    /// fake-volume with one more option, `token`, that is required.
    pub required_option: PathBuf,
    /// fake-volume that prints to standard output on every create (a line that looks like JSON).
    pub chatty_volume: PathBuf,
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            fs::copy(e.path(), dest).unwrap();
        }
    }
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "fixture patch {from:?} must match exactly once");
    text.replacen(from, to, 1)
}

/// The manifest of a copy of plugin-api at `version` (same package name: it is part of the ABI).
pub fn api_manifest(version: &str) -> String {
    format!(
        "[package]\nname = \"plughost-api\"\nversion = \"{version}\"\nedition = \"2021\"\n\n[lib]\nname = \"plughost_api\"\n\n\
         [dependencies]\nabi_stable = \"0.11.3\"\nlibc = {{ version = \"0.2\", optional = true }}\n\
         serde = {{ version = \"1\", features = [\"derive\"], optional = true }}\n\n\
         [features]\nhost = [\"dep:libc\", \"dep:serde\"]\ntesting = []\n"
    )
}

/// Copies plugin-api to `dir/api-copy-DIRNAME` at `version`, applying `patch` to `src/volume.rs`. (Not
/// to `dir/plugin-api`, nor to one name for every fixture workspace: cargo tells path dependencies apart
/// by name, version and path relative to their workspace, so two copies at the same version and
/// relative path would be taken for one another in the shared target dir, and the first one built
/// would serve both.)
fn api_copy(dir: &Path, version: &str, patch: impl Fn(String) -> String) -> PathBuf {
    let tag = dir.file_name().expect("a fixture workspace has a name").to_string_lossy().into_owned();
    let dest = dir.join(format!("api-copy-{tag}"));
    let _ = fs::remove_dir_all(&dest);
    copy_dir(&workspace_root().join("plugin-api/src"), &dest.join("src"));
    fs::write(dest.join("Cargo.toml"), api_manifest(version)).unwrap();
    let vol = dest.join("src/volume.rs");
    fs::write(&vol, patch(fs::read_to_string(&vol).unwrap())).unwrap();
    dest
}

/// This plugin-api's version with the minor number raised by one.
pub fn next_minor() -> String {
    let mut parts = plughost_api::API_VERSION.split('.');
    let major = parts.next().unwrap();
    let minor: u32 = parts.next().unwrap().parse().unwrap();
    format!("{major}.{}.0", minor + 1)
}

/// A fixture driver crate `name` with the given source, depending on plugin-api at `api`.
fn driver_crate(dir: &Path, name: &str, api: &Path, source: &str) {
    driver_crate_with(dir, name, api, source, "");
}

/// Like [`driver_crate`], with extra dependency lines.
fn driver_crate_with(dir: &Path, name: &str, api: &Path, source: &str, extra_deps: &str) {
    let d = dir.join(name);
    fs::create_dir_all(d.join("src")).unwrap();
    fs::write(
        d.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"0.0.1\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nplughost-api = {{ path = {:?} }}\n{extra_deps}",
            api.display().to_string()
        ),
    )
    .unwrap();
    fs::write(d.join("src/lib.rs"), source).unwrap();
}

/// A one-off workspace holding `members`, with the main lock file so that it builds offline.
fn build_workspace(dir: &Path, members: &[&str]) {
    let list: Vec<String> = members.iter().map(|m| format!("{m:?}")).collect();
    fs::write(dir.join("Cargo.toml"), format!("[workspace]\nresolver = \"2\"\nmembers = [{}]\n", list.join(", ")))
        .unwrap();
    let lock = dir.join("Cargo.lock");
    if !lock.exists() {
        fs::copy(workspace_root().join("Cargo.lock"), &lock).unwrap();
    }
    let status = cargo().current_dir(dir).args(["build", "--quiet", "--offline", "--workspace"]).status().unwrap();
    assert!(status.success(), "building fixture workspace {} failed", dir.display());
}

fn fake_volume_source(rename: &str) -> String {
    let src = fs::read_to_string(workspace_root().join("plugins/fake-volume/src/lib.rs")).unwrap();
    // Unit tests of the original would need dev-dependencies; drop them.
    let src = src.split("#[cfg(test)]").next().unwrap().to_owned();
    replace_once(&src, "name: \"fake-volume\",", &format!("name: {rename:?},"))
}

/// Builds (once per test process) the drivers compiled against altered plugin-api copies.
pub fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = target_dir().join("fixtures");
        fs::create_dir_all(&root).unwrap();

        let ws = root.join("changed-signature");
        fs::create_dir_all(&ws).unwrap();
        // A method whose parameter changed type (`extend`'s new size: u64 -> u32), the driver adapted.
        let api = api_copy(&ws, plughost_api::API_VERSION, |s| {
            replace_once(
                &s,
                "fn extend(name: &str => RStr<'_>, String, new_size: u64 => u64, u64)",
                "fn extend(name: &str => RStr<'_>, String, new_size: u32 => u32, u32)",
            )
        });
        let changed = replace_once(
            &fake_volume_source("changed-signature"),
            "fn extend(&self, name: &str, new_size: u64) -> Result<Volume, DriverError> {",
            "fn extend(&self, name: &str, new_size32: u32) -> Result<Volume, DriverError> {\n        let new_size = u64::from(new_size32);",
        );
        driver_crate(&ws, "fixture-changed-signature", &api, &changed);
        build_workspace(&ws, &["fixture-changed-signature"]);

        let ws = root.join("api-v2");
        fs::create_dir_all(&ws).unwrap();
        let api = api_copy(&ws, "2.0.0", |s| s);
        driver_crate(&ws, "fixture-api-v2", &api, &fake_volume_source("api-v2"));
        build_workspace(&ws, &["fixture-api-v2"]);

        let ws = root.join("api-v1-1");
        fs::create_dir_all(&ws).unwrap();
        let api = api_copy(&ws, &next_minor(), |s| s);
        driver_crate(&ws, "fixture-api-minor", &api, &fake_volume_source("api-minor"));
        let bad = fake_volume_source("Bad Name!").replace(
            "OptionSpec::size(\"capacity\", \"total capacity; creating or extending past it fails\").default(\"100GiB\")",
            "OptionSpec::size(\"capacity\", \"total capacity\").default(\"lots\")",
        );
        let real_api = workspace_root().join("plugin-api");
        driver_crate(&ws, "fixture-bad-metadata", &real_api, &bad);
        let file_volume = fs::read_to_string(workspace_root().join("plugins/file-volume/src/lib.rs")).unwrap();
        let file_volume = file_volume.split("#[cfg(test)]").next().unwrap().to_owned();
        let file_volume_b = replace_once(&file_volume, "version: env!(\"CARGO_PKG_VERSION\"),", "version: \"1.0.1-b\",");
        driver_crate_with(&ws, "fixture-file-volume-b", &real_api, &file_volume_b, "libc = \"0.2\"\n");
        let sickly = replace_once(&file_volume, "version: env!(\"CARGO_PKG_VERSION\"),", "version: \"1.0.2-sickly\",");
        let sickly = replace_once(
            &sickly,
            "    fn health(&self) -> Result<(), DriverError> {\n",
            "    fn health(&self) -> Result<(), DriverError> {\n        \
             static CHECKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);\n        \
             if CHECKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 1 {\n            \
             return Err(DriverError::internal(\"sickly: unhealthy after its first health check\"));\n        }\n",
        );
        driver_crate_with(&ws, "fixture-file-volume-sickly", &real_api, &sickly, "libc = \"0.2\"\n");
        let picky = replace_once(&file_volume, "version: env!(\"CARGO_PKG_VERSION\"),", "version: \"1.0.3-picky\",");
        let picky = replace_once(
            &picky,
            "    fn init(&self) -> Result<(), DriverError> {\n",
            "    fn init(&self) -> Result<(), DriverError> {\n        \
             if self.root.join(\".old-layout\").exists() {\n            \
             return Err(DriverError::internal(\"picky: the volume root has the old layout\"));\n        }\n",
        );
        driver_crate_with(&ws, "fixture-file-volume-picky", &real_api, &picky, "libc = \"0.2\"\n");
        let flaky = replace_once(&file_volume, "version: env!(\"CARGO_PKG_VERSION\"),", "version: \"1.0.4-flaky\",");
        let flaky = replace_once(
            &flaky,
            "    fn get(&self, name: &str) -> Result<Volume, DriverError> {\n",
            "    fn get(&self, name: &str) -> Result<Volume, DriverError> {\n        \
             if !name.is_empty() {\n            \
             return Err(DriverError::internal(format!(\"flaky: volume {name:?}: cannot read it\")));\n        }\n",
        );
        driver_crate_with(&ws, "fixture-file-volume-flaky", &real_api, &flaky, "libc = \"0.2\"\n");
        let faulty = fs::read_to_string(workspace_root().join("plugins/faulty/src/lib.rs")).unwrap();
        let faulty = replace_once(
            &faulty,
            "OptionSpec::boolean(\"panic_new\", \"the constructor panics\").default(\"false\")",
            "OptionSpec::boolean(\"panic_new\", \"the constructor panics\").default(\"true\")",
        );
        driver_crate_with(&ws, "fixture-faulty-panics", &real_api, &faulty, "libc = \"0.2\"\n");
        let segv = fs::read_to_string(workspace_root().join("plugins/faulty/src/lib.rs")).unwrap();
        let segv = replace_once(
            &segv,
            "OptionSpec::string(\"crash\", \"a fault that takes the whole process: segv, abort, exit, hang, deadlock or leak\")\n        .default(\"\"),",
            "OptionSpec::string(\"crash\", \"a fault that takes the whole process: segv, abort, exit, hang, deadlock or leak\")\n        .default(\"segv\"),",
        );
        let segv = replace_once(&segv, "    .default(\"\"),\n    OptionSpec::integer(\"crash_after\"", "    .default(\"init\"),\n    OptionSpec::integer(\"crash_after\"");
        driver_crate_with(&ws, "fixture-faulty-segv-init", &real_api, &segv, "libc = \"0.2\"\n");
        let sloppy = replace_once(
            &fake_volume_source("sloppy-volume"),
            "        if new_size < old {",
            "        if new_size < old && false {",
        );
        let sloppy = replace_once(&sloppy, "self.ensure_room(&map, new_size - old)?;", "self.ensure_room(&map, new_size.saturating_sub(old))?;");
        let sloppy = replace_once(&sloppy, "            volumes: map.len() as u64,", "            volumes: map.len() as u64 + 1,");
        driver_crate(&ws, "fixture-sloppy-volume", &real_api, &sloppy);
        driver_crate(
            &ws,
            "fixture-rlib-only",
            &real_api,
            "//! An author forgot the cdylib.\npub fn nothing_to_load() {}\n",
        );
        let manifest = ws.join("fixture-rlib-only/Cargo.toml");
        let text = fs::read_to_string(&manifest).unwrap();
        fs::write(&manifest, replace_once(&text, "crate-type = [\"cdylib\"]", "crate-type = [\"rlib\"]")).unwrap();
        driver_crate(
            &ws,
            "fixture-no-export",
            &real_api,
            "//! An author forgot export_driver!.\n#[no_mangle]\npub extern \"C\" fn not_a_driver() -> u64 {\n    \
             plughost_api::API_VERSION.len() as u64\n}\n",
        );
        let required = replace_once(
            &fake_volume_source("required-option"),
            "OptionSpec::size(\"capacity\", \"total capacity; creating or extending past it fails\").default(\"100GiB\")",
            "OptionSpec::size(\"capacity\", \"total capacity; creating or extending past it fails\").default(\"100GiB\"),\n    \
             OptionSpec::string(\"token\", \"an API token\").required()",
        );
        driver_crate(&ws, "fixture-required-option", &real_api, &required);
        let chatty = replace_once(
            &fake_volume_source("chatty-volume"),
            "    fn create(&self, name: &str, size: u64) -> Result<Volume, DriverError> {\n",
            "    fn create(&self, name: &str, size: u64) -> Result<Volume, DriverError> {\n        \
             println!(\"{{\\\"creating\\\": {name:?}}}\");\n",
        );
        driver_crate(&ws, "fixture-chatty-volume", &real_api, &chatty);
        build_workspace(
            &ws,
            &[
                "fixture-api-minor",
                "fixture-bad-metadata",
                "fixture-file-volume-b",
                "fixture-file-volume-sickly",
                "fixture-file-volume-picky",
                "fixture-file-volume-flaky",
                "fixture-faulty-panics",
                "fixture-faulty-segv-init",
                "fixture-sloppy-volume",
                "fixture-rlib-only",
                "fixture-no-export",
                "fixture-required-option",
                "fixture-chatty-volume",
            ],
        );

        let out = profile_dir();
        Built {
            changed_signature: out.join("libfixture_changed_signature.so"),
            api_v2: out.join("libfixture_api_v2.so"),
            api_v1_1: out.join("libfixture_api_minor.so"),
            bad_metadata: out.join("libfixture_bad_metadata.so"),
            file_volume_b: out.join("libfixture_file_volume_b.so"),
            file_volume_sickly: out.join("libfixture_file_volume_sickly.so"),
            file_volume_picky: out.join("libfixture_file_volume_picky.so"),
            file_volume_flaky: out.join("libfixture_file_volume_flaky.so"),
            faulty_panics: out.join("libfixture_faulty_panics.so"),
            faulty_segv_init: out.join("libfixture_faulty_segv_init.so"),
            sloppy_volume: out.join("libfixture_sloppy_volume.so"),
            rlib_only: out.join("libfixture_rlib_only.so"),
            no_export: out.join("libfixture_no_export.so"),
            required_option: out.join("libfixture_required_option.so"),
            chatty_volume: out.join("libfixture_chatty_volume.so"),
        }
    })
}

/// A copy of a real driver with its abi_stable header claiming abi_stable 0.10.
pub fn old_abi_stable(dir: &Path) -> PathBuf {
    let mut bytes = fs::read(driver("fake-volume")).unwrap();
    let magic = b"abi stable library for Rust     ";
    let mut patched = 0;
    let mut i = 0;
    while let Some(pos) = bytes[i..].windows(magic.len()).position(|w| w == magic) {
        let at = i + pos + magic.len();
        // AbiHeader { magic_string: [u8; 32], abi_major: u32, abi_minor: u32 }
        bytes[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
        bytes[at + 4..at + 8].copy_from_slice(&10u32.to_le_bytes());
        patched += 1;
        i = at;
    }
    assert!(patched > 0, "abi_stable magic string not found in fake-volume");
    let p = dir.join("libold_abi_stable.so");
    fs::write(&p, bytes).unwrap();
    p
}

/// A copy of a real driver whose ELF header says aarch64 (or x86_64 on an aarch64 host).
pub fn other_machine(dir: &Path) -> PathBuf {
    let mut bytes = fs::read(driver("fake-volume")).unwrap();
    let other: u16 = if cfg!(target_arch = "aarch64") { 62 } else { 183 };
    bytes[18..20].copy_from_slice(&other.to_le_bytes());
    let p = dir.join("libother_machine.so");
    fs::write(&p, bytes).unwrap();
    p
}

/// The first half of a real driver.
pub fn truncated(dir: &Path) -> PathBuf {
    let bytes = fs::read(driver("fake-volume")).unwrap();
    let p = dir.join("libtruncated.so");
    fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    p
}

/// The C library this test process runs with: a real shared library that is not a driver.
pub fn system_library() -> PathBuf {
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
        .map(PathBuf::from)
        .expect("libc is mapped into the test process")
}

/// A release-built `cdylib` exporting `extern "C" fn plughost_bench_noop(u64) -> u64`: the raw
/// function-pointer baseline of the benchmarks.
pub fn noop_cdylib_release() -> PathBuf {
    let ws = target_dir().join("fixtures").join("bench-noop");
    let krate = ws.join("bench-noop");
    fs::create_dir_all(krate.join("src")).unwrap();
    fs::write(
        krate.join("Cargo.toml"),
        "[package]\nname = \"bench-noop\"\nversion = \"0.0.1\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n",
    )
    .unwrap();
    fs::write(
        krate.join("src/lib.rs"),
        "#[no_mangle]\npub extern \"C\" fn plughost_bench_noop(x: u64) -> u64 {\n    x\n}\n",
    )
    .unwrap();
    fs::write(ws.join("Cargo.toml"), "[workspace]\nresolver = \"2\"\nmembers = [\"bench-noop\"]\n").unwrap();
    let status = cargo().current_dir(&ws).args(["build", "--quiet", "--offline", "--release"]).status().unwrap();
    assert!(status.success(), "building the bench-noop fixture failed");
    crate::release_dir().join("libbench_noop.so")
}

/// A library that exports the plughost root symbol (so it passes every check made without loading it)
/// and aborts the process from an ELF initializer as soon as it is loaded.
pub fn crash_on_load() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let ws = target_dir().join("fixtures").join("crash-on-load");
            let krate = ws.join("crash-on-load");
            fs::create_dir_all(krate.join("src")).unwrap();
            fs::write(
                krate.join("Cargo.toml"),
                "[package]\nname = \"crash-on-load\"\nversion = \"0.0.1\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n",
            )
            .unwrap();
            fs::write(
                krate.join("src/lib.rs"),
                format!(
                    "#[no_mangle]\npub static {}: [u8; 64] = [0; 64];\n\nextern \"C\" fn boom() {{\n    std::process::abort();\n}}\n\n#[used]\n#[link_section = \".init_array\"]\nstatic INIT: extern \"C\" fn() = boom;\n",
                    plughost_api::host::ROOT_SYMBOL
                ),
            )
            .unwrap();
            fs::write(ws.join("Cargo.toml"), "[workspace]\nresolver = \"2\"\nmembers = [\"crash-on-load\"]\n").unwrap();
            let status = cargo().current_dir(&ws).args(["build", "--quiet", "--offline"]).status().unwrap();
            assert!(status.success(), "building the crash-on-load fixture failed");
            profile_dir().join("libcrash_on_load.so")
        })
        .clone()
}

/// A library that exports the plughost root symbol and, from an ELF initializer (the earliest code of
/// a library that runs), writes `PID UID` to [`marker_path`]: which process ran its code, as whom.
pub fn marker_on_load() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let ws = target_dir().join("fixtures").join("marker-on-load");
            let krate = ws.join("marker-on-load");
            fs::create_dir_all(krate.join("src")).unwrap();
            let marker_dir = marker_path().parent().unwrap().to_owned();
            fs::create_dir_all(&marker_dir).unwrap();
            // Anyone may write the marker: the point is to see who did.
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&marker_dir, fs::Permissions::from_mode(0o1777)).unwrap();
            fs::write(
                krate.join("Cargo.toml"),
                "[package]\nname = \"marker-on-load\"\nversion = \"0.0.1\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n",
            )
            .unwrap();
            fs::write(
                krate.join("src/lib.rs"),
                format!(
                    "#[no_mangle]\npub static {}: [u8; 64] = [0; 64];\n\nextern \"C\" {{ fn getuid() -> u32; }}\n\nextern \"C\" fn mark() {{\n    // SAFETY: getuid has no preconditions.\n    let uid = unsafe {{ getuid() }};\n    let _ = std::fs::write({:?}, format!(\"{{}} {{}}\", std::process::id(), uid));\n}}\n\n#[used]\n#[link_section = \".init_array\"]\nstatic INIT: extern \"C\" fn() = mark;\n",
                    plughost_api::host::ROOT_SYMBOL,
                    marker_path().display().to_string()
                ),
            )
            .unwrap();
            fs::write(ws.join("Cargo.toml"), "[workspace]\nresolver = \"2\"\nmembers = [\"marker-on-load\"]\n").unwrap();
            let status = cargo().current_dir(&ws).args(["build", "--quiet", "--offline"]).status().unwrap();
            assert!(status.success(), "building the marker-on-load fixture failed");
            profile_dir().join("libmarker_on_load.so")
        })
        .clone()
}

/// Where [`marker_on_load`]'s initializer writes.
pub fn marker_path() -> PathBuf {
    target_dir().join("fixtures").join("marker-on-load").join("out").join("marker")
}
