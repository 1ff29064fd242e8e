//! Subjects and headers: where a request goes, and what travels beside its payload.
//!
//! - `ph.<fleet>.rpc.<host>.<service>.<backend or _>.<read|admin>`: a service's operations on one host
//!   (`_` when the request names no backend: the service's default);
//! - `ph.<fleet>.rpc.<host>.host._.<read|admin>`: the host's own (`ping`, `status`, `reload`, `audit`);
//! - `ph.<fleet>.all.<read|admin>`: every host of the fleet answers.
//!
//! The payload is exactly one line of the control socket protocol, without its newline.

use std::fmt;

/// The caller's protocol version.
pub const HEADER_API: &str = "Plughost-Api";
/// When the caller stops waiting, in milliseconds since the epoch: a request that arrives later is
/// answered `timeout` and not run.
pub const HEADER_DEADLINE: &str = "Plughost-Deadline";
/// The caller's id for the request (logged with it).
pub const HEADER_REQUEST_ID: &str = "Plughost-Request-Id";

/// Where a user's answers come back: `_INBOX.ph.<user>.…`. The server lets each user subscribe to its
/// own prefix only (docs/fleet.md), so that the host can name who asked from the reply subject.
pub const INBOX_PREFIX: &str = "_INBOX.ph";

/// The subject token of a request that names no backend, and of the host's own operations.
pub const NO_BACKEND: &str = "_";
/// The service token of the host's own operations.
pub const HOST_SERVICE: &str = "host";

/// Reads or changes: which subjects a user may publish on mirrors the socket's roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Operations open to readers (`status`, `get`, `list`, ...).
    Read,
    /// Everything else (mutations, swaps, reloads, the audit log).
    Admin,
}

impl Class {
    /// The subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Admin => "admin",
        }
    }

    /// The class of an operation that `reads` or not.
    pub fn of(reads: bool) -> Class {
        if reads {
            Class::Read
        } else {
            Class::Admin
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The subject of a request to one host: `service` `None` for the host's own operations, `backend`
/// `None` when the request names none.
pub fn rpc(fleet: &str, host: &str, service: Option<&str>, backend: Option<&str>, class: Class) -> String {
    format!("ph.{fleet}.rpc.{host}.{}.{}.{class}", service.unwrap_or(HOST_SERVICE), backend.unwrap_or(NO_BACKEND))
}

/// Every subject of requests to `host`.
pub fn rpc_all(fleet: &str, host: &str) -> String {
    format!("ph.{fleet}.rpc.{host}.>")
}

/// The subject of a request every host answers.
pub fn broadcast(fleet: &str, class: Class) -> String {
    format!("ph.{fleet}.all.{class}")
}

/// Every broadcast subject.
pub fn broadcast_all(fleet: &str) -> String {
    format!("ph.{fleet}.all.*")
}

/// The services table's bucket.
pub fn bucket(fleet: &str) -> String {
    format!("ph_{fleet}_hosts")
}

/// The bucket of rollout records (`fleet swap`): one entry per rollout, and one lock per backend.
pub fn rollouts_bucket(fleet: &str) -> String {
    format!("ph_{fleet}_rollouts")
}

/// The inbox prefix of `user`'s client.
pub fn inbox_prefix(user: &str) -> String {
    format!("{INBOX_PREFIX}.{user}")
}

/// The user a reply subject names (`_INBOX.ph.<user>.<id>.<n>`), if it follows that shape.
pub fn user_of_reply(reply: &str) -> Option<&str> {
    let rest = reply.strip_prefix(INBOX_PREFIX)?.strip_prefix('.')?;
    let (user, tail) = rest.split_once('.')?;
    (!user.is_empty() && !tail.is_empty() && crate::names::check("user", user).is_ok()).then_some(user)
}

/// What a subject addressed, as the host it arrived at reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressed {
    /// This host: a service (or `None`: the host itself), a backend (or `None`), a class.
    Host {
        /// The service token (`None` for `host`).
        service: Option<String>,
        /// The backend token (`None` for `_`).
        backend: Option<String>,
        /// Read or admin.
        class: Class,
    },
    /// Every host.
    All {
        /// Read or admin.
        class: Class,
    },
}

impl Addressed {
    /// Its class.
    pub fn class(&self) -> Class {
        match self {
            Addressed::Host { class, .. } | Addressed::All { class } => *class,
        }
    }
}

/// Reads a subject that arrived at `host` of `fleet`.
pub fn parse(fleet: &str, host: &str, subject: &str) -> Result<Addressed, String> {
    let bad = || format!("subject {subject:?} is not a plughost request subject of fleet {fleet:?} host {host:?}");
    let class = |t: &str| match t {
        "read" => Ok(Class::Read),
        "admin" => Ok(Class::Admin),
        _ => Err(bad()),
    };
    let tokens: Vec<&str> = subject.split('.').collect();
    match tokens.as_slice() {
        ["ph", f, "all", c] if *f == fleet => Ok(Addressed::All { class: class(c)? }),
        ["ph", f, "rpc", h, service, backend, c] if *f == fleet && *h == host => Ok(Addressed::Host {
            service: (*service != HOST_SERVICE).then(|| (*service).to_owned()),
            backend: (*backend != NO_BACKEND).then(|| (*backend).to_owned()),
            class: class(c)?,
        }),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let s = rpc("prod", "h2", Some("volume"), None, Class::Admin);
        assert_eq!(s, "ph.prod.rpc.h2.volume._.admin");
        assert_eq!(
            parse("prod", "h2", &s).unwrap(),
            Addressed::Host { service: Some("volume".into()), backend: None, class: Class::Admin }
        );
        let s = rpc("prod", "h2", None, None, Class::Read);
        assert_eq!(s, "ph.prod.rpc.h2.host._.read");
        assert_eq!(
            parse("prod", "h2", &s).unwrap(),
            Addressed::Host { service: None, backend: None, class: Class::Read }
        );
        let s = rpc("prod", "h2", Some("volume"), Some("fast"), Class::Read);
        assert_eq!(
            parse("prod", "h2", &s).unwrap(),
            Addressed::Host { service: Some("volume".into()), backend: Some("fast".into()), class: Class::Read }
        );
        assert_eq!(
            parse("prod", "h2", &broadcast("prod", Class::Read)).unwrap(),
            Addressed::All { class: Class::Read }
        );
        // Another host's, another fleet's, a made-up class, a short subject.
        for s in ["ph.prod.rpc.h3.volume._.read", "ph.dev.all.read", "ph.prod.all.write", "ph.prod.rpc.h2.volume"] {
            assert!(parse("prod", "h2", s).is_err(), "{s}");
        }
    }

    #[test]
    fn the_user_comes_from_the_inbox() {
        assert_eq!(user_of_reply("_INBOX.ph.alice.abc.1"), Some("alice"));
        assert_eq!(user_of_reply(&format!("{}.x.1", inbox_prefix("bob"))), Some("bob"));
        assert_eq!(user_of_reply("_INBOX.abc.1"), None);
        assert_eq!(user_of_reply("_INBOX.ph.alice"), None);
        assert_eq!(user_of_reply("elsewhere"), None);
    }
}
