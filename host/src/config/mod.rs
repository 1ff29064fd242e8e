//! `plughost run` settings: command line > environment (`PLUGHOST_*`, read by clap) > config file
//! (TOML) > built-in defaults. The per-service parts (`[volume]`, `--volume-driver`, ...) come from the
//! service table ([`crate::services::kinds::KINDS`]). A [`ConfigSource`] is what the host re-reads on reload.
//!
//! Files: `error`, `file` (the TOML file and its trust check), `flags` (`plughost run`'s flags and
//! environment), `resolve` (precedence, settings, trust settings, reload source), `sample` (`config
//! sample`).

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
