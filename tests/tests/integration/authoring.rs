//! What a driver author gets: the conformance suite through `plughost check`, and `plughost new`.

use plughost_tests::process::run;
use plughost_tests::{driver, fixtures};
use serde_json::Value;

fn check_json(path: &std::path::Path, opts: &[&str]) -> (i32, Value) {
    let mut args = vec!["check", "--json"];
    for o in opts {
        args.extend(["--opt", o]);
    }
    args.push(path.to_str().unwrap());
    let r = run(&args);
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    (r.code, v)
}

fn failed(v: &Value) -> Vec<String> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_reference_driver_passes_the_conformance_suite_through_the_loader() {
    for (name, opts) in [
        ("fake-volume", vec![]),
        ("file-volume", vec!["sync=false"]),
        ("faulty", vec![]),
        ("fake-compute", vec![]),
        ("process-compute", vec![]),
        ("fake-network", vec![]),
    ] {
        let (code, v) = check_json(&driver(name), &opts);
        assert_eq!((code, failed(&v)), (0, Vec::<String>::new()), "{name}: {v}");
        use plughost_api::testing::{COMPUTE_CHECKS, NETWORK_CHECKS, VOLUME_CHECKS};
        let expected = match name {
            n if n.ends_with("compute") => COMPUTE_CHECKS.len(),
            n if n.ends_with("network") => NETWORK_CHECKS.len(),
            _ => VOLUME_CHECKS.len(),
        };
        assert_eq!(v["checks"].as_array().unwrap().len(), expected, "{name}: {v}");
    }
}

#[test]
fn a_sloppy_driver_fails_exactly_the_checks_it_should() {
    let (code, v) = check_json(&fixtures::built().sloppy_volume, &[]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(failed(&v), ["shrink_is_invalid_argument", "stats_match_list"], "{v}");
    let r = run(&["check", fixtures::built().sloppy_volume.to_str().unwrap()]);
    assert!(
        r.stdout.contains("FAIL  shrink_is_invalid_argument") && r.stdout.contains("15 checks, 13 passed, 2 failed"),
        "{}",
        r.stdout
    );
}

#[test]
fn what_cannot_be_checked_says_why() {
    let (code, v) = check_json(&fixtures::system_library(), &[]);
    assert_eq!(code, 1);
    assert!(v["error"].as_str().unwrap().contains("not a plughost driver"), "{v}");
    let (code, v) = check_json(&fixtures::crash_on_load(), &[]);
    assert_eq!(code, 1);
    assert!(v["error"].as_str().unwrap().contains("killed the check process (signal 6, SIGABRT)"), "{v}");
    let (code, v) = check_json(&driver("fake-volume"), &["bogus=1"]);
    assert_eq!(code, 1);
    assert!(v["error"].as_str().unwrap().contains("unknown option"), "{v}");
}

#[test]
fn a_driver_that_aborts_mid_suite_is_named_with_the_check_that_was_running() {
    // faulty aborts the whole process on its first snapshot (missing_is_not_found snapshots a missing
    // volume): the child dies; what it said before stays.
    let opts = ["crash=abort", "crash_on=snapshot"];
    let (code, v) = check_json(&driver("faulty"), &opts);
    assert_eq!(code, 1, "{v}");
    assert!(v["driver"].as_str().unwrap().starts_with("faulty "), "the library loaded: {v}");
    let checks = v["checks"].as_array().unwrap();
    let (last, before) = checks.split_last().unwrap();
    assert!(!before.is_empty() && before.iter().all(|c| c["passed"] == true), "{v}");
    let running = last["name"].as_str().unwrap();
    assert_eq!(running, "missing_is_not_found", "{v}");
    assert_eq!(last["passed"], false);
    assert!(last["detail"].as_str().unwrap().contains("signal 6, SIGABRT"), "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.contains("killed the check process (signal 6, SIGABRT) during check \"missing_is_not_found\""),
        "{v}"
    );
    // For people: the driver, the checks that ran, and the one that was running.
    let r = run(&["check", "--opt", opts[0], "--opt", opts[1], driver("faulty").to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(!r.stdout.contains("not loaded"), "{}", r.stdout);
    assert!(r.stdout.contains("FAIL  missing_is_not_found"), "{}", r.stdout);
    assert!(r.stdout.contains("pass  lifecycle"), "{}", r.stdout);
}

#[test]
fn what_a_driver_prints_to_standard_output_does_not_spoil_the_report() {
    let (code, v) = check_json(&fixtures::built().chatty_volume, &[]);
    assert_eq!((code, failed(&v)), (0, Vec::<String>::new()), "{v}");
}

/// Every file under `dir` (not `target/`).
fn files_under(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if !p.ends_with("target") {
                files_under(&p, out);
            }
        } else {
            out.push(p);
        }
    }
}

#[test]
fn a_new_driver_crate_passes_cargo_test_and_plughost_check_as_generated() {
    use plughost_tests::{cargo, plughost, target_dir, workspace_root};
    // Outside the checkout (a crate inside it would find this repository's workspace above its own):
    // the generated crates, and a copy of the binary alone, so that nothing it writes can depend on
    // where it was built.
    struct Outside(std::path::PathBuf);
    impl Drop for Outside {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    impl Outside {
        fn path(&self) -> &std::path::Path {
            &self.0
        }
        fn join(&self, p: impl AsRef<std::path::Path>) -> std::path::PathBuf {
            self.0.join(p)
        }
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let t = Outside(std::env::temp_dir().join(format!("plughost-new-{}-{nanos}", std::process::id())));
    let bin = t.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("plughost");
    std::fs::copy(plughost(), &exe).unwrap();
    let new = |args: &[&str]| -> plughost_tests::process::Ran {
        std::process::Command::new(&exe).args(args).current_dir(t.path()).output().unwrap().into()
    };
    // One target dir for the generated crates across runs, so that their dependencies build once.
    let target = target_dir().join("scaffold");
    let api = plughost_api::API_VERSION.rsplit_once('.').unwrap().0.to_owned();
    for (name, kind, checks) in
        [("my-volume", "volume", 15), ("my-compute", "compute", 11), ("my-network", "network", 10)]
    {
        let r = new(&["new", name, "--kind", kind]);
        assert_eq!(r.code, 0, "{r:?}");
        let dir = t.join(name);
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(manifest.contains(&format!("\n[dependencies]\nplughost-api = \"{api}\"\n")), "{manifest}");
        assert!(
            manifest.contains("[patch.crates-io]\nplughost-api = { path = \"vendor/plughost-api\" }\n"),
            "{manifest}"
        );
        // No path of this machine in anything generated: not the checkout, not the target dir, not the
        // binary's directory, not the temp dir.
        let mut files = Vec::new();
        files_under(&dir, &mut files);
        let forbidden = [workspace_root(), target_dir(), t.path().to_owned()];
        for f in &files {
            let text = String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned();
            for p in &forbidden {
                assert!(!text.contains(&p.display().to_string()), "{} names {}", f.display(), p.display());
            }
        }
        // The vendored source is exactly plughost-api's.
        for rel in ["src/lib.rs", "src/testing.rs", "src/interface.rs", "CHANGELOG.md"] {
            assert_eq!(
                std::fs::read(dir.join("vendor/plughost-api").join(rel)).unwrap(),
                std::fs::read(workspace_root().join("plugin-api").join(rel)).unwrap(),
                "{rel}"
            );
        }
        // The workspace's lock file, so that the build needs nothing new from the network.
        std::fs::copy(workspace_root().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
        for step in [["test", "--offline"], ["build", "--offline"]] {
            let status = cargo()
                .current_dir(&dir)
                .env("CARGO_TARGET_DIR", &target)
                .args(step)
                .arg("--quiet")
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "cargo {step:?} of the generated {kind} driver failed");
        }
        let lib = target.join("debug").join(format!("lib{}.so", name.replace('-', "_")));
        let (code, v) = check_json(&lib, &[]);
        assert_eq!((code, failed(&v)), (0, Vec::<String>::new()), "{v}");
        assert_eq!(v["checks"].as_array().unwrap().len(), checks);
        // What the generated README says: a host finding the driver by name in target/, and a swap of a
        // new build by name, inside the driver directories.
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
        let other = if kind == "compute" { "volume" } else { "compute" };
        let run_line = format!(
            "plughost run --state-dir ./state --driver-dir target/release --{kind}-driver {name} --{other}-driver none"
        );
        assert!(readme.contains(&run_line), "{readme}");
        assert!(readme.contains(&format!("plughost ctl --socket state/plughost.sock swap {kind} {name}")), "{readme}");
        let state = t.join(format!("{name}-state"));
        let dirs = target.join("debug");
        let mut d = plughost_tests::process::Daemon::start(
            &state,
            &[
                "--driver-dir",
                dirs.to_str().unwrap(),
                &format!("--{kind}-driver"),
                name,
                &format!("--{other}-driver"),
                "none",
            ],
        );
        let swapped = d.ok(kind, "swap", serde_json::json!({"driver": name}));
        assert_eq!(swapped["generation"], 1, "{swapped}");
        // By a path outside the driver directories: refused, naming the way out as flag and as key.
        let elsewhere = t.join(format!("lib{}-elsewhere.so", name.replace('-', "_")));
        std::fs::copy(&lib, &elsewhere).unwrap();
        let v = d.call(kind, "swap", serde_json::json!({"driver": elsewhere.to_str().unwrap()}));
        assert_eq!(v["error"]["kind"], "permission_denied", "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("--allow-swap-paths") && msg.contains("trust.allow_swap_paths = true"), "{msg}");
    }
    // The vendored plughost-api builds and passes its own tests as a package on its own.
    let vendored = t.join("my-volume/vendor/plughost-api");
    std::fs::copy(workspace_root().join("Cargo.lock"), vendored.join("Cargo.lock")).unwrap();
    let status = cargo()
        .current_dir(&vendored)
        .env("CARGO_TARGET_DIR", target_dir().join("vendored-api"))
        .args(["test", "--offline", "--quiet", "--features", "testing"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the vendored plughost-api does not pass its tests on its own");
    let again = new(&["new", "my-volume", "--kind", "volume"]);
    assert_eq!(again.code, 1);
    assert!(again.stderr.contains("exists and is not empty"), "{}", again.stderr);
    let bad = new(&["new", "My Driver", "--kind", "volume"]);
    assert!(bad.code == 1 && bad.stderr.contains("use 1-64 of a-z 0-9 - _"), "{bad:?}");
    assert_eq!(new(&["new", "x", "--kind", "storage"]).code, 2, "--kind values are the kinds with a template");
    let help = new(&["new", "--help"]);
    assert_eq!(help.stdout.matches("[default: ").count(), 1, "{}", help.stdout);
    // api-source writes the same package anywhere.
    let r = new(&["api-source", "api"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        std::fs::read(t.join("api/Cargo.toml")).unwrap(),
        std::fs::read(workspace_root().join("plugin-api/Cargo.toml")).unwrap()
    );
}

#[test]
fn five_author_mistakes_each_name_their_fix() {
    let built = fixtures::built();
    // 1. crate-type without cdylib: no .so, an .rlib beside where it was expected.
    let (code, v) = check_json(&built.rlib_only, &[]);
    assert_eq!(code, 1);
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("libfixture_rlib_only.rlib is there")
            && e.contains("add crate-type = [\"cdylib\", \"rlib\"] under [lib]"),
        "{e}"
    );
    // 2. No export_driver!.
    let (code, v) = check_json(&built.no_export, &[]);
    assert_eq!(code, 1);
    assert!(v["error"].as_str().unwrap().contains("drivers use plughost_api::export_driver!"), "{v}");
    // 3. A panicking constructor.
    let (code, v) = check_json(&built.faulty_panics, &[]);
    assert_eq!(code, 1);
    let e = v["error"].as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    assert!(e.contains("return an Err(DriverError) from the constructor instead"), "{e}");
    // 4. A missing required option: the message of the driver's own cargo test (TestHost), with the fix.
    const SCHEMA: &[plughost_api::OptionSpec] = &[plughost_api::OptionSpec::string("token", "an API token").required()];
    let in_test = plughost_api::testing::TestHost::new().options(SCHEMA, &[]).unwrap_err();
    assert_eq!(in_test.message(), "option \"token\": required option missing");
    let (code, v) = check_json(&built.required_option, &[]);
    assert_eq!(code, 1);
    let e = v["error"].as_str().unwrap();
    assert!(e.contains(&format!("{} (give it with --opt token=VALUE)", in_test.message())), "{e}");
    let (code, v) = check_json(&built.required_option, &["token=t0"]);
    assert_eq!((code, failed(&v)), (0, Vec::<String>::new()), "{v}");
    // 5. Another major version of plughost-api.
    let (code, v) = check_json(&built.api_v2, &[]);
    assert_eq!(code, 1);
    let api = plughost_api::API_VERSION.rsplit_once('.').unwrap().0.to_owned();
    let fix = format!("rebuild it against plughost-api 1.x (plughost-api = \"{api}\" in its Cargo.toml)");
    assert!(v["error"].as_str().unwrap().contains(&fix), "{v}");
}

#[test]
fn plughost_api_packages_for_crates_io() {
    use plughost_tests::{cargo, workspace_root};
    let out = cargo()
        .current_dir(workspace_root())
        .args(["package", "-p", "plughost-api", "--offline", "--allow-dirty", "--list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let files = String::from_utf8(out.stdout).unwrap();
    for f in ["Cargo.toml", "README.md", "CHANGELOG.md", "RELEASES", "src/lib.rs", "src/testing.rs"] {
        assert!(files.lines().any(|l| l == f), "{f} is not in the package:\n{files}");
    }
    let status = cargo()
        .current_dir(workspace_root())
        .args(["package", "-p", "plughost-api", "--offline", "--allow-dirty", "--quiet"])
        .status()
        .unwrap();
    assert!(status.success(), "cargo package (with its verification build) failed");
}
