//! The loader and `plughost inspect` / `list`, on real driver libraries and on broken files made here.
//! One test per rejection kind, as in abi_stable's loading-errors tests.

use std::path::Path;

use host::{LoadErrorKind, Loader};
use plughost_api::{ComputeDriver, DriverKind, ErrorKind, Options, VolumeDriver};
use plughost_api::{ComputeInterface, VolumeInterface};
use plughost_tests::process::run;
use plughost_tests::{driver, fixtures, TempDir};

fn rejected(path: &Path) -> host::LoadError {
    let loader = Loader::new();
    match loader.load(path) {
        Ok(lib) => panic!("{} loaded as {:?}, expected a rejection", path.display(), lib.name()),
        Err(e) => {
            // Every rejection is one line naming the path.
            let line = e.to_string();
            assert!(line.starts_with(&format!("cannot load driver \"{}\": ", path.display())), "{line}");
            assert!(!line.contains('\n') && !line.ends_with('.'), "{line:?}");
            e
        }
    }
}

/// `plughost inspect PATH` on a bad file: exit 1, one `plughost: cannot load driver` headline, no panic.
fn inspect_rejects(path: &Path, reason_part: &str) {
    let r = run(&["inspect", path.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{r:?}");
    let first = r.stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with(&format!("plughost: cannot load driver \"{}\": ", path.display())), "{r:?}");
    assert!(first.contains(reason_part), "expected {reason_part:?} in {first:?}");
    assert!(!r.stderr.contains("panicked"), "{r:?}");
    assert!(r.stdout.is_empty(), "{r:?}");
}

#[test]
fn reference_drivers_load_with_their_metadata() {
    let loader = Loader::new();
    let v = loader.load(&driver("fake-volume")).unwrap();
    assert_eq!((v.name(), v.kind(), v.api_version()), ("fake-volume", DriverKind::VOLUME, plughost_api::API_VERSION));
    assert!(v.options().iter().any(|o| o.name() == "capacity"));
    assert!(v.digest.starts_with("blake3:") && v.digest.len() == 71);
    let c = loader.load(&driver("fake-compute")).unwrap();
    assert_eq!((c.name(), c.kind()), ("fake-compute", DriverKind::COMPUTE));
}

#[test]
fn not_found() {
    let t = TempDir::new("nf");
    let p = t.join("libmissing.so");
    assert_eq!(rejected(&p).kind, LoadErrorKind::NotFound);
    inspect_rejects(&p, "no such file");
}

#[test]
fn directory_is_not_a_file() {
    let t = TempDir::new("dir");
    assert_eq!(rejected(t.path()).kind, LoadErrorKind::NotAFile);
    inspect_rejects(t.path(), "a directory");
}

#[test]
fn unreadable_file() {
    // Root reads everything; this check only means something for other users.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return;
    }
    let t = TempDir::new("unreadable");
    let p = t.join("libx.so");
    std::fs::write(&p, b"x").unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    assert_eq!(rejected(&p).kind, LoadErrorKind::NotAFile);
}

#[test]
fn empty_file() {
    let t = TempDir::new("empty");
    let p = t.join("libempty.so");
    std::fs::write(&p, b"").unwrap();
    assert_eq!(rejected(&p).kind, LoadErrorKind::NotElf);
    inspect_rejects(&p, "empty file");
}

#[test]
fn text_file() {
    let t = TempDir::new("text");
    let p = t.join("libtext.so");
    std::fs::write(&p, "this is not a library\n").unwrap();
    assert_eq!(rejected(&p).kind, LoadErrorKind::NotElf);
    inspect_rejects(&p, "not an ELF shared object");
}

#[test]
fn truncated_copy_of_a_real_driver() {
    let t = TempDir::new("trunc");
    let p = fixtures::truncated(t.path());
    assert_eq!(rejected(&p).kind, LoadErrorKind::NotElf);
    inspect_rejects(&p, "truncated");
}

#[test]
fn executable_is_not_a_shared_object_driver() {
    let p = plughost_tests::plughost();
    let e = rejected(&p);
    assert!(matches!(e.kind, LoadErrorKind::NotElf | LoadErrorKind::NotADriver), "{e}");
}

#[test]
fn elf_for_another_machine() {
    let t = TempDir::new("machine");
    let p = fixtures::other_machine(t.path());
    assert_eq!(rejected(&p).kind, LoadErrorKind::WrongMachine);
    inspect_rejects(&p, "ELF shared object for");
}

#[test]
fn system_library_is_not_a_driver() {
    let p = fixtures::system_library();
    assert_eq!(rejected(&p).kind, LoadErrorKind::NotADriver);
    inspect_rejects(&p, "not a plughost driver");
}

#[test]
fn incompatible_abi_stable() {
    let t = TempDir::new("abi");
    let p = fixtures::old_abi_stable(t.path());
    let e = rejected(&p);
    assert_eq!(e.kind, LoadErrorKind::IncompatibleAbiStable, "{e}");
    assert!(e.reason.contains("0.10"), "{e}");
    inspect_rejects(&p, "incompatible abi_stable");
}

#[test]
fn incompatible_plugin_api_major_version_names_both_versions() {
    let p = &fixtures::built().api_v2;
    let e = rejected(p);
    assert_eq!(e.kind, LoadErrorKind::IncompatibleApiVersion, "{e}");
    let host_has = format!("host has {}", plughost_api::API_VERSION);
    assert!(e.reason.contains(&host_has) && e.reason.contains("built against 2.0.0"), "{e}");
    inspect_rejects(p, "incompatible plugin-api version");
}

#[test]
fn newer_compatible_minor_version_loads() {
    let p = &fixtures::built().api_v1_1;
    let loader = Loader::new();
    let lib = loader.load(p).unwrap();
    assert_eq!(lib.api_version(), fixtures::next_minor());
    let v = lib.construct::<VolumeInterface>(&lib.validate_options(&[]).unwrap()).unwrap().driver;
    assert_eq!(v.create("a", 10).unwrap().size, 10);
}

#[test]
fn changed_method_signature_is_a_layout_mismatch() {
    let p = &fixtures::built().changed_signature;
    let e = rejected(p);
    assert_eq!(e.kind, LoadErrorKind::LayoutMismatch, "{e}");
    assert!(!e.details.is_empty() && e.details.len() <= 3, "{:?}", e.details);
    let details = e.details.join("\n");
    assert!(details.contains("u64") && details.contains("u32"), "{details}");
    assert!(
        e.reason.contains("parameter new_size of method extend (in VolumeDriverFfi_TO): expected u64, found u32"),
        "the one-line reason names the differing type and field: {e}"
    );
    let r = run(&["inspect", p.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.lines().count() <= 4, "summary, not abi_stable's dump:\n{}", r.stderr);
    assert!(r.stderr.contains("layout mismatch"), "{}", r.stderr);
}

#[test]
fn a_library_that_crashes_while_loading_is_refused_and_inspect_survives() {
    let p = fixtures::crash_on_load();
    let r = run(&["inspect", "--json", p.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["error"]["kind"], "crashed", "{v}");
    let msg = v[0]["error"]["message"].as_str().unwrap();
    assert!(msg.contains("killed a probe process (signal 6, SIGABRT)"), "{msg}");
    inspect_rejects(&p, "killed a probe process");
    // `list` of a directory holding it reports it and carries on.
    let t = TempDir::new("crashdir");
    std::fs::copy(&p, t.join("libcrash.so")).unwrap();
    std::fs::copy(driver("fake-volume"), t.join("libfake_volume.so")).unwrap();
    let r = run(&["list", "--driver-dir", t.path().to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.lines().any(|l| l.contains("rejected") && l.contains("probe process")), "{}", r.stdout);
    assert!(r.stdout.lines().any(|l| l.starts_with("fake-volume")), "{}", r.stdout);
}

#[test]
fn wrong_kind() {
    let loader = Loader::new();
    let e = loader.load_kind(&driver("fake-compute"), DriverKind::VOLUME).unwrap_err();
    assert_eq!(e.kind, LoadErrorKind::WrongKind);
    assert!(e.reason.contains("is a compute driver, expected a volume driver"), "{e}");
    let lib = loader.load(&driver("fake-volume")).unwrap();
    assert_eq!(lib.construct::<ComputeInterface>(&Options::default()).unwrap_err().kind, LoadErrorKind::WrongKind);
}

#[test]
fn invalid_metadata() {
    let p = &fixtures::built().bad_metadata;
    let e = rejected(p);
    assert_eq!(e.kind, LoadErrorKind::InvalidMetadata, "{e}");
    let all = format!("{}\n{}", e.reason, e.details.join("\n"));
    assert!(all.contains("driver name \"Bad Name!\""), "{all}");
    assert!(all.contains("default \"lots\" is not a valid size"), "{all}");
    inspect_rejects(p, "invalid metadata");
}

#[test]
fn invalid_options_are_all_reported_before_construction() {
    let loader = Loader::new();
    let lib = loader.load(&driver("faulty")).unwrap();
    let given = vec![("nope".to_owned(), "1".to_owned()), ("delay_ms".to_owned(), "soon".to_owned())];
    let e = lib.validate_options(&given).unwrap_err();
    assert_eq!(e.kind, LoadErrorKind::InvalidOptions);
    assert_eq!(e.details.len(), 2, "{:?}", e.details);
}

#[test]
fn constructor_error() {
    let loader = Loader::new();
    let lib = loader.load(&driver("faulty")).unwrap();
    let opts = lib.validate_options(&[("fail_new".into(), "true".into())]).unwrap();
    let e = lib.construct::<VolumeInterface>(&opts).unwrap_err();
    assert_eq!(e.kind, LoadErrorKind::ConstructorFailed, "{e}");
    assert!(e.reason.contains("constructor failed as asked"), "{e}");
}

#[test]
fn constructor_panic_is_contained_and_the_process_goes_on() {
    let loader = Loader::new();
    let lib = loader.load(&driver("faulty")).unwrap();
    let opts = lib.validate_options(&[("panic_new".into(), "true".into())]).unwrap();
    let e = lib.construct::<VolumeInterface>(&opts).unwrap_err();
    assert_eq!(e.kind, LoadErrorKind::ConstructorPanicked, "{e}");
    assert!(e.reason.contains("constructor panicked as asked"), "{e}");
    // The same process loads and uses other drivers afterwards.
    let fake = loader.load(&driver("fake-volume")).unwrap();
    let v = fake.construct::<VolumeInterface>(&fake.validate_options(&[]).unwrap()).unwrap().driver;
    assert_eq!(v.create("after", 1).unwrap().name, "after");
}

#[test]
fn method_panics_and_errors_are_contained() {
    let loader = Loader::new();
    let lib = loader.load(&driver("faulty")).unwrap();
    let opts =
        lib.validate_options(&[("panic_in".into(), "create,list".into()), ("fail_in".into(), "get".into())]).unwrap();
    let v = lib.construct::<VolumeInterface>(&opts).unwrap().driver;
    for _ in 0..3 {
        let e = v.create("x", 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PANICKED);
        assert!(e.message().contains("faulty: create panicked as asked"), "{e}");
        assert!(e.message().contains("src/lib.rs:"), "panic location is reported: {e}");
    }
    assert_eq!(v.list().unwrap_err().kind(), ErrorKind::PANICKED);
    assert_eq!(v.get("x").unwrap_err().kind(), ErrorKind::INTERNAL);
    assert!(v.stats().is_ok(), "other methods keep working after panics");
    // And a different driver in the same process still works.
    let c = loader.load(&driver("fake-compute")).unwrap();
    let c = c.construct::<ComputeInterface>(&c.validate_options(&[]).unwrap()).unwrap().driver;
    assert!(c.list().unwrap().is_empty());
}

#[test]
fn same_content_at_two_paths_is_verified_once_and_rebuilt_content_is_new() {
    let t = TempDir::new("copy");
    let a = t.join("liba.so");
    std::fs::copy(driver("fake-volume"), &a).unwrap();
    let loader = Loader::new();
    let first = loader.load(&a).unwrap();
    let b = t.join("libb.so");
    std::fs::copy(&a, &b).unwrap();
    let second = loader.load(&b).unwrap();
    assert_eq!(first.digest, second.digest);
    assert_eq!(loader.mapped().len(), 1);
    // A different library at the same path is really loaded (copy-on-load defeats dlopen's path cache).
    std::fs::copy(driver("faulty"), &a).unwrap();
    let third = loader.load(&a).unwrap();
    assert_eq!(third.name(), "faulty");
    assert_eq!(loader.mapped().len(), 2);
}

#[test]
fn inspect_reports_every_rejection_together_and_never_dies() {
    let t = TempDir::new("all");
    let empty = t.join("libempty.so");
    std::fs::write(&empty, b"").unwrap();
    let built = fixtures::built();
    let bad = [
        t.join("libmissing.so"),
        empty,
        fixtures::truncated(t.path()),
        fixtures::other_machine(t.path()),
        fixtures::system_library(),
        fixtures::old_abi_stable(t.path()),
        built.api_v2.clone(),
        built.changed_signature.clone(),
        built.bad_metadata.clone(),
    ];
    let mut args = vec!["inspect".to_owned(), driver("fake-volume").display().to_string()];
    args.extend(bad.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run(&args);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("name:        fake-volume"), "{}", r.stdout);
    for p in &bad {
        assert!(r.stderr.contains(&format!("plughost: cannot load driver \"{}\"", p.display())), "{}", r.stderr);
    }
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);

    let mut json_args = vec!["inspect", "--json"];
    json_args.extend(&args[1..]);
    let r = run(&json_args);
    assert_eq!(r.code, 1);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), bad.len() + 1);
    assert_eq!(arr[0]["ok"], true);
    assert_eq!(arr[0]["kind"], "volume");
    assert_eq!(arr[0]["api_version"], plughost_api::API_VERSION);
    assert!(arr[0]["options"].as_array().unwrap().iter().any(|o| o["name"] == "capacity" && o["type"] == "size"));
    let kinds: Vec<&str> = arr[1..].iter().map(|o| o["error"]["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "not_found",
            "not_elf",
            "not_elf",
            "wrong_machine",
            "not_a_driver",
            "incompatible_abi_stable",
            "incompatible_api_version",
            "layout_mismatch",
            "invalid_metadata"
        ]
    );
}

#[test]
fn inspect_accepts_every_reference_driver_and_rejects_everything_else_in_the_build_dir() {
    plughost_tests::build();
    let dir = plughost_tests::profile_dir();
    let mut checked = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if !p.is_file() {
            continue;
        }
        let r = run(&["inspect", "--json", p.to_str().unwrap()]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        // The compatible-minor fixture is a valid driver too; every other fixture is broken on purpose.
        let reference = plughost_tests::DRIVERS.iter().any(|d| name == format!("lib{}.so", d.replace('-', "_")))
            || [
                "libfixture_api_minor.so",
                "libfixture_file_volume_b.so",
                "libfixture_file_volume_sickly.so",
                "libfixture_file_volume_picky.so",
                "libfixture_file_volume_flaky.so",
                "libfixture_faulty_panics.so",
                "libfixture_faulty_segv_init.so",
                "libfixture_sloppy_volume.so",
                "libfixture_required_option.so",
                "libfixture_chatty_volume.so",
            ]
            .contains(&name.as_str());
        assert_eq!(v[0]["ok"], reference, "{name}: {v}");
        assert_eq!(r.code, if reference { 0 } else { 1 }, "{name}");
        checked += 1;
    }
    assert!(checked > plughost_tests::DRIVERS.len());
}

#[test]
fn list_shows_drivers_and_rejections_in_a_driver_dir() {
    let t = TempDir::new("list");
    std::fs::copy(driver("fake-volume"), t.join("libfake_volume.so")).unwrap();
    std::fs::write(t.join("libjunk.so"), "junk").unwrap();
    std::fs::write(t.join("README"), "not scanned").unwrap();
    let r = run(&["list", "--driver-dir", t.path().to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let ours: Vec<&serde_json::Value> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["path"].as_str().unwrap().starts_with(t.path().to_str().unwrap()))
        .collect();
    assert_eq!(ours.len(), 2);
    assert_eq!(ours[0]["name"], "fake-volume");
    assert_eq!(ours[1]["error"]["kind"], "not_elf");
    let r = run(&["list", "--driver-dir", t.path().to_str().unwrap()]);
    assert!(r.stdout.lines().any(|l| l.starts_with("fake-volume") && l.contains("volume")), "{}", r.stdout);
    assert!(r.stdout.lines().any(|l| l.contains("rejected") && l.contains("libjunk.so")), "{}", r.stdout);
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(run(&["inspect"]).code, 2);
    assert_eq!(run(&["frobnicate"]).code, 2);
    let help = run(&["inspect", "--help"]);
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("Example:"));
}
