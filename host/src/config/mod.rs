//! `plughost run` settings: command line > environment (`PLUGHOST_*`, read by clap) > config file
//! (TOML) > built-in defaults. The per-service parts (`[volume]`, `--volume-driver`, ...) come from the
//! service table ([`crate::services::kinds::KINDS`]). A [`ConfigSource`] is what the host re-reads on reload.
//!
//! Files: `error`, `file` (the TOML file and its trust check), `flags` (`plughost run`'s flags and
//! environment), `resolve` (precedence, settings, trust settings, reload source, system defaults),
//! `sample` (`config sample`), `check` (`config check`, `config show`).

pub mod check;
mod error;
mod file;
mod flags;
mod resolve;
pub mod sample;

pub use crate::backend::settings::{BackendSettings, BackendSpec, Isolation};
pub use error::ConfigError;
pub use file::{parse, read_file, BackendConfig, FileConfig, FleetConfig, ServiceConfig, TrustConfig, Urls};
pub use flags::{RunFlags, ServiceFlagSet, ServiceFlags};
pub use resolve::{
    default_socket, default_state_dir, read_credentials, resolve, service_kind, service_spec, ConfigSource, FleetSpec,
    ServiceSpec, Settings, TrustSettings,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::kinds::{self, KINDS};
    use crate::services::ServiceKind;
    use std::path::Path;

    fn volume() -> &'static ServiceKind {
        kinds::kind("volume").expect("volume is registered")
    }

    #[test]
    fn parse_errors_have_line_and_column() {
        let e = parse(Path::new("c.toml"), "state_dir = \"x\"\n[volume]\ndriver = 5\n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { line: 3, .. }), "{e}");
        let e = parse(Path::new("c.toml"), "bogus = 1\n").unwrap_err();
        assert!(e.to_string().starts_with("config \"c.toml\": line 1, column 1: unknown field"), "{e}");
        let e = parse(Path::new("c.toml"), "[volume]\ndriver = \"x\"\n\n[storage]\ndriver = \"y\"\n").unwrap_err();
        assert!(e.to_string().starts_with("config \"c.toml\": line 4, column 2: unknown field `storage`"), "{e}");
    }

    #[test]
    fn flags_override_file_and_backends_merge() {
        let file = parse(
            Path::new("c.toml"),
            "[volume]\ndriver = \"file-volume\"\noptions = { root = \"/a\" }\n[[volume.backends]]\nname = \"fast\"\ndriver = \"fake-volume\"\n",
        )
        .unwrap();
        let flags = ServiceFlags {
            opts: vec!["root=/b".into(), "fast:capacity=1GiB".into()],
            default_backend: Some("fast".into()),
            ..Default::default()
        };
        let s = service_spec(volume(), file.services.get("volume"), &flags).unwrap().unwrap();
        assert_eq!(s.backends.len(), 2);
        assert_eq!(s.backends[0].options, [("root".to_owned(), "/b".to_owned())]);
        assert_eq!(s.backends[1].options, [("capacity".to_owned(), "1GiB".to_owned())]);
        assert_eq!(s.default_backend, "fast");
        let none = ServiceFlags { driver: Some("none".into()), ..Default::default() };
        assert!(service_spec(volume(), None, &none).unwrap().is_none());
        let bad = ServiceFlags { opts: vec!["nope:x=1".into()], ..Default::default() };
        assert!(service_spec(volume(), None, &bad).is_err());
    }

    #[test]
    fn every_registered_service_has_its_flags_and_section() {
        use clap::{Args, FromArgMatches};
        let cmd = RunFlags::augment_args(clap::Command::new("run"));
        let m = cmd
            .try_get_matches_from([
                "run",
                "--volume-driver",
                "x",
                "--compute-opt",
                "a=1",
                "--default-compute-backend",
                "b",
            ])
            .unwrap();
        let flags = RunFlags::from_arg_matches(&m).unwrap();
        assert_eq!(flags.services.0["volume"].driver.as_deref(), Some("x"));
        assert_eq!(flags.services.0["compute"].opts, ["a=1"]);
        assert_eq!(flags.services.0["compute"].default_backend.as_deref(), Some("b"));
        for k in KINDS {
            let text = format!("[{}]\ndriver = \"none\"\n", k.name);
            assert!(parse(Path::new("c.toml"), &text).unwrap().services.contains_key(k.name));
        }
    }
}

#[cfg(test)]
mod fleet_tests {
    use super::*;
    use std::path::Path;

    fn fleet(text: &str, flags: RunFlags) -> Result<Option<FleetSpec>, String> {
        let file = parse(Path::new("c.toml"), text).map_err(|e| e.to_string())?;
        let mut flags = flags;
        flags.services.0.insert("volume", ServiceFlags { driver: Some("fake-volume".into()), ..Default::default() });
        resolve(&flags, &file)
            .map(|s| s.fleet)
            .map_err(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
    }

    #[test]
    fn off_unless_a_url_is_given_and_flags_win() {
        assert_eq!(fleet("", RunFlags::default()).unwrap(), None);
        assert_eq!(fleet("[fleet]\nname = \"prod\"\n", RunFlags::default()).unwrap(), None);
        let f = fleet(
            "[fleet]\nurl = \"nats://127.0.0.1:4222\"\nhost = \"from-file\"\nreport_interval = \"2s\"\n[fleet.labels]\ndisk = \"ssd\"\n",
            RunFlags { host_name: Some("from-flag".into()), fleet_labels: vec!["rack=r1".into()], ..Default::default() },
        )
        .unwrap()
        .unwrap();
        assert_eq!(f.settings.host, "from-flag");
        assert_eq!(f.settings.name, "default");
        assert_eq!(f.settings.report_interval, std::time::Duration::from_secs(2));
        assert_eq!(f.settings.service_down_time, std::time::Duration::from_secs(60));
        assert_eq!(f.settings.labels.len(), 2);
        let f = fleet(
            "[fleet]\nurl = [\"nats://127.0.0.1:1\", \"nats://127.0.0.1:2\"]\nhost = \"h\"\n",
            RunFlags::default(),
        );
        assert_eq!(f.unwrap().unwrap().settings.urls.len(), 2);
    }

    #[test]
    fn bad_fleet_settings_are_refused_naming_the_key() {
        let url = "[fleet]\nurl = \"nats://127.0.0.1:4222\"\n";
        let e = fleet(&format!("{url}host = \"web.1\"\n"), RunFlags::default()).unwrap_err();
        assert!(e.contains("fleet host \"web.1\": character '.'"), "{e}");
        let e = fleet(&format!("{url}host = \"h\"\nreport_interval = \"30s\"\n"), RunFlags::default()).unwrap_err();
        assert!(e.contains("fleet.service_down_time 60s must be more than twice fleet.report_interval 30s"), "{e}");
        let e = fleet("[fleet]\nurl = \"nats://10.1.2.3:4222\"\nhost = \"h\"\n", RunFlags::default()).unwrap_err();
        assert!(e.contains("without TLS"), "{e}");
        assert!(fleet(
            "[fleet]\nurl = \"nats://10.1.2.3:4222\"\nhost = \"h\"\nallow_plaintext = true\n",
            RunFlags::default()
        )
        .unwrap()
        .is_some());
        let e = fleet(&format!("{url}host = \"h\"\nbogus = 1\n"), RunFlags::default()).unwrap_err();
        assert!(e.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn a_credentials_file_others_could_write_or_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("plughost-creds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let creds = dir.join("fleet.creds");
        std::fs::write(&creds, "h1:secret\n").unwrap();
        let check = |mode: u32| {
            std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(mode)).unwrap();
            read_credentials(&creds).map(|_| ()).map_err(|e| e.to_string())
        };
        assert_eq!(check(0o600), Ok(()));
        let e = check(0o604).unwrap_err();
        assert!(e.contains("readable by others") && e.contains("fleet.creds"), "{e}");
        let e = check(0o620).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        if crate::loading::trust::euid() == 0 {
            std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::chown(&creds, Some(65534), Some(65534)).unwrap();
            let e = read_credentials(&creds).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains("owned by another user"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
