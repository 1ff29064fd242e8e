//! What a host or a client needs to join a fleet.

use std::collections::BTreeMap;
use std::time::Duration;

/// How to authenticate to the broker, read from a credentials file (the host checks the file's owner
/// and mode like a driver file's before reading it).
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A user and a password (`user:password`, or the user on the first line and the password on the
    /// second).
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// An nkey user seed (`SU…`).
    Nkey(String),
    /// A `.creds` file (a user JWT and its seed), as `nsc` writes it.
    Creds(String),
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::UserPassword { user, .. } => write!(f, "UserPassword({user:?}, (secret))"),
            Credentials::Nkey(_) => f.write_str("Nkey((secret))"),
            Credentials::Creds(_) => f.write_str("Creds((secret))"),
        }
    }
}

impl Credentials {
    /// Reads a credentials file's text; `path` names it in the error.
    pub fn parse(path: &str, text: &str) -> Result<Credentials, String> {
        if text.contains("-----BEGIN NATS USER JWT-----") {
            return Ok(Credentials::Creds(text.to_owned()));
        }
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
        match lines.as_slice() {
            [seed] if seed.starts_with("SU") && !seed.contains(':') => Ok(Credentials::Nkey((*seed).to_owned())),
            [line] => match line.split_once(':') {
                Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                    Ok(Credentials::UserPassword { user: user.to_owned(), password: password.to_owned() })
                }
                _ => Err(format!(
                    "fleet credentials \"{path}\": expected user:password, an nkey seed (SU...) or a .creds file"
                )),
            },
            [user, password] => {
                Ok(Credentials::UserPassword { user: (*user).to_owned(), password: (*password).to_owned() })
            }
            _ => Err(format!(
                "fleet credentials \"{path}\": expected user:password, an nkey seed (SU...) or a .creds file"
            )),
        }
    }

    /// The user name, when the credentials carry one that can name an inbox.
    pub fn user(&self) -> Option<&str> {
        match self {
            Credentials::UserPassword { user, .. } if crate::names::check("user", user).is_ok() => Some(user),
            _ => None,
        }
    }
}

/// A host's fleet settings (resolved by the host from `[fleet]`, flags and the environment).
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSettings {
    /// The broker's URLs (a cluster's servers).
    pub urls: Vec<String>,
    /// The fleet (subjects and bucket are named after it).
    pub name: String,
    /// This host's name in the fleet.
    pub host: String,
    /// How to authenticate.
    pub credentials: Option<Credentials>,
    /// How often the host reports (and at once on any change).
    pub report_interval: Duration,
    /// A host whose last report is older than this is down.
    pub service_down_time: Duration,
    /// Threads running remote requests.
    pub request_workers: usize,
    /// Free-form labels (placement filters on them).
    pub labels: BTreeMap<String, String>,
    /// A non-loopback `nats://` URL without TLS was allowed (`fleet.allow_plaintext`).
    pub allow_plaintext: bool,
}

/// Checks a broker URL: `nats://`, `tls://` or a bare `host:port`. A URL that would carry requests in
/// plaintext off this machine is refused unless `allow_plaintext`; `Ok(true)` when it is allowed that
/// way (the host warns in `status`).
pub fn check_url(url: &str, allow_plaintext: bool) -> Result<bool, String> {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s, r),
        None => ("nats", url),
    };
    if !matches!(scheme, "nats" | "tls") {
        return Err(format!("fleet url {url:?}: scheme {scheme:?} is not nats:// or tls://"));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
    };
    if host.is_empty() {
        return Err(format!("fleet url {url:?}: no host"));
    }
    if authority.contains('@') {
        return Err(format!(
            "fleet url {url:?}: credentials in the URL would show in status and ps; use fleet.credentials"
        ));
    }
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if scheme == "tls" || loopback {
        return Ok(false);
    }
    if allow_plaintext {
        return Ok(true);
    }
    Err(format!(
        "fleet url {url:?}: requests would cross the network without TLS; use tls:// or set fleet.allow_plaintext = true"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_off_the_machine_needs_a_yes() {
        assert_eq!(check_url("nats://127.0.0.1:4222", false), Ok(false));
        assert_eq!(check_url("localhost:4222", false), Ok(false));
        assert_eq!(check_url("nats://[::1]:4222", false), Ok(false));
        assert_eq!(check_url("tls://broker.example:4222", false), Ok(false));
        let e = check_url("nats://10.0.0.5:4222", false).unwrap_err();
        assert!(e.contains("without TLS") && e.contains("allow_plaintext"), "{e}");
        assert_eq!(check_url("nats://10.0.0.5:4222", true), Ok(true));
        assert!(check_url("http://127.0.0.1:4222", false).unwrap_err().contains("scheme"));
        assert!(check_url("nats://u:p@127.0.0.1:4222", false).unwrap_err().contains("fleet.credentials"));
    }

    #[test]
    fn credentials_files() {
        assert_eq!(
            Credentials::parse("f", "alice:s3cret\n").unwrap(),
            Credentials::UserPassword { user: "alice".into(), password: "s3cret".into() }
        );
        assert_eq!(
            Credentials::parse("f", "# admin\nalice\ns3cret\n").unwrap(),
            Credentials::UserPassword { user: "alice".into(), password: "s3cret".into() }
        );
        assert!(matches!(Credentials::parse("f", "SUAAXYZ\n").unwrap(), Credentials::Nkey(_)));
        let e = Credentials::parse("/etc/x", "nonsense").unwrap_err();
        assert!(e.starts_with("fleet credentials \"/etc/x\""), "{e}");
        let shown = format!("{:?}", Credentials::parse("f", "alice:s3cret").unwrap());
        assert!(shown.contains("alice") && !shown.contains("s3cret"), "{shown}");
    }
}
