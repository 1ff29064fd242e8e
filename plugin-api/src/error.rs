//! The error type every driver method returns.

use std::fmt;

use abi_stable::std_types::RString;
use abi_stable::StableAbi;

/// What went wrong, as a stable number with a well-known name.
///
/// This is a transparent `u32` rather than a Rust `enum` so that a host can receive a kind added by a
/// newer plugin-api without undefined behaviour: unknown kinds display as `unknown`.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, PartialEq, Eq, Hash)]
pub struct ErrorKind(u32);

impl ErrorKind {
    /// The named resource does not exist.
    pub const NOT_FOUND: ErrorKind = ErrorKind(1);
    /// An argument or option value is not acceptable.
    pub const INVALID_ARGUMENT: ErrorKind = ErrorKind(2);
    /// A resource with that name exists already.
    pub const ALREADY_EXISTS: ErrorKind = ErrorKind(3);
    /// The driver does not implement this operation.
    pub const UNSUPPORTED: ErrorKind = ErrorKind(4);
    /// The resource is in use or in a state that forbids the operation; retrying later may work.
    pub const BUSY: ErrorKind = ErrorKind(5);
    /// Any other failure inside the driver (I/O, a failed command, a bug).
    pub const INTERNAL: ErrorKind = ErrorKind(6);
    /// Driver code panicked; the panic was caught inside the plugin and turned into this error.
    pub const PANICKED: ErrorKind = ErrorKind(7);
    /// Not enough space, memory or other capacity.
    pub const NO_CAPACITY: ErrorKind = ErrorKind(8);
    /// The process serving the driver died during the call (a host sets this for a driver isolated in
    /// a worker process; drivers never return it).
    pub const DRIVER_CRASHED: ErrorKind = ErrorKind(9);
    /// The call did not finish in time and the process serving the driver was stopped (a host sets
    /// this; drivers never return it).
    pub const TIMEOUT: ErrorKind = ErrorKind(10);

    /// The stable snake_case name used in logs and on the control socket.
    pub fn as_str(self) -> &'static str {
        match self.0 {
            1 => "not_found",
            2 => "invalid_argument",
            3 => "already_exists",
            4 => "unsupported",
            5 => "busy",
            6 => "internal",
            7 => "panicked",
            8 => "no_capacity",
            9 => "driver_crashed",
            10 => "timeout",
            _ => "unknown",
        }
    }

    /// The kind with the given [`as_str`](Self::as_str) name, if there is one (host side; hidden,
    /// removed in 2.0).
    #[doc(hidden)]
    #[deprecated(since = "1.2.0", note = "host side; removed in 2.0")]
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        (1..=10).map(ErrorKind).find(|k| k.as_str() == name)
    }
}

impl fmt::Debug for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error returned by a driver: a [`ErrorKind`] and a one-line, lowercase message.
///
/// Messages should name the resource concerned (`volume "v1" not found`), have no trailing period and
/// contain no newline.
#[repr(C)]
#[derive(StableAbi, Clone, PartialEq, Eq)]
pub struct DriverError {
    kind: ErrorKind,
    message: RString,
}

impl DriverError {
    /// An error of any kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> DriverError {
        DriverError { kind, message: RString::from(message.into()) }
    }
    /// [`ErrorKind::NOT_FOUND`].
    pub fn not_found(message: impl Into<String>) -> DriverError {
        DriverError::new(ErrorKind::NOT_FOUND, message)
    }
    /// [`ErrorKind::INVALID_ARGUMENT`].
    pub fn invalid_argument(message: impl Into<String>) -> DriverError {
        DriverError::new(ErrorKind::INVALID_ARGUMENT, message)
    }
    /// [`ErrorKind::ALREADY_EXISTS`].
    pub fn already_exists(message: impl Into<String>) -> DriverError {
        DriverError::new(ErrorKind::ALREADY_EXISTS, message)
    }
    /// [`ErrorKind::UNSUPPORTED`].
    pub fn unsupported(message: impl Into<String>) -> DriverError {
        DriverError::new(ErrorKind::UNSUPPORTED, message)
    }
    /// [`ErrorKind::BUSY`].
    pub fn busy(message: impl Into<String>) -> DriverError {
        DriverError::new(ErrorKind::BUSY, message)
    }
    /// [`ErrorKind::INTERNAL`].
    pub fn internal(message: impl Into<String>) -> DriverError {
        DriverError::new(ErrorKind::INTERNAL, message)
    }
    /// [`ErrorKind::NO_CAPACITY`].
    pub fn no_capacity(message: impl Into<String>) -> DriverError {
        DriverError::new(ErrorKind::NO_CAPACITY, message)
    }
    /// Maps an I/O error to the closest kind, prefixing its text with `context`
    /// (e.g. `creating "/var/v1"`).
    pub fn io(context: impl fmt::Display, err: &std::io::Error) -> DriverError {
        use std::io::ErrorKind as Io;
        // By number where std's kind is newer than this crate's rust-version: EFBIG (a size the
        // filesystem cannot hold) and EDQUOT (a quota).
        let kind = match (err.raw_os_error(), err.kind()) {
            (Some(27), _) => ErrorKind::INVALID_ARGUMENT,
            (Some(122), _) => ErrorKind::NO_CAPACITY,
            (_, kind) => match kind {
                Io::NotFound => ErrorKind::NOT_FOUND,
                Io::AlreadyExists => ErrorKind::ALREADY_EXISTS,
                Io::InvalidInput => ErrorKind::INVALID_ARGUMENT,
                Io::StorageFull => ErrorKind::NO_CAPACITY,
                Io::ResourceBusy | Io::WouldBlock => ErrorKind::BUSY,
                Io::Unsupported => ErrorKind::UNSUPPORTED,
                _ => ErrorKind::INTERNAL,
            },
        };
        DriverError::new(kind, format!("{context}: {err}"))
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The message, without the kind.
    pub fn message(&self) -> &str {
        self.message.as_str()
    }
}

impl fmt::Debug for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DriverError({}: {})", self.kind, self.message)
    }
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DriverError {}

#[cfg(feature = "host")]
mod wire {
    use super::*;

    /// How a [`DriverError`] crosses a process boundary: the kind as its number, so that kinds this host
    /// does not know survive the trip.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Wire {
        kind: u32,
        message: String,
    }

    impl serde::Serialize for DriverError {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            Wire { kind: self.kind.0, message: self.message.to_string() }.serialize(s)
        }
    }

    impl<'de> serde::Deserialize<'de> for DriverError {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DriverError, D::Error> {
            let w = Wire::deserialize(d)?;
            Ok(DriverError::new(ErrorKind(w.kind), w.message))
        }
    }
}

/// The resource-name rule shared by the host and drivers: 1-64 of `A-Z a-z 0-9 . _ -`, not starting
/// with `.` or `-`. Such a name can be used as a file name and cannot escape a directory.
///
/// ```
/// assert!(plughost_api::check_name("volume", "db-01.data").is_ok());
/// assert!(plughost_api::check_name("volume", "../etc").is_err());
/// ```
pub fn check_name(what: &str, name: &str) -> Result<(), DriverError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        // Echo at most 80 characters: a megabyte of name gives a line, not a megabyte of message.
        let shown = match name.char_indices().nth(80) {
            None => format!("{name:?}"),
            Some((cut, _)) => format!("{:?}… ({} bytes)", &name[..cut], name.len()),
        };
        Err(DriverError::invalid_argument(format!(
            "invalid {what} name {shown}: use 1-64 of A-Z a-z 0-9 . _ - (not starting with . or -)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_escape_a_directory() {
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "-rf", "a b", &"x".repeat(65)] {
            assert_eq!(check_name("volume", bad).unwrap_err().kind(), ErrorKind::INVALID_ARGUMENT, "{bad:?}");
        }
        for good in ["a", "v1", "db-01.data", "A_b.c-d", &"x".repeat(64)] {
            assert!(check_name("volume", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn io_errors_map_to_the_kinds_a_caller_can_act_on() {
        let kind = |errno: i32| DriverError::io("x", &std::io::Error::from_raw_os_error(errno)).kind();
        assert_eq!(kind(28), ErrorKind::NO_CAPACITY, "ENOSPC");
        assert_eq!(kind(122), ErrorKind::NO_CAPACITY, "EDQUOT");
        assert_eq!(kind(27), ErrorKind::INVALID_ARGUMENT, "EFBIG: a size the filesystem cannot hold");
        assert_eq!(kind(2), ErrorKind::NOT_FOUND);
        assert_eq!(kind(5), ErrorKind::INTERNAL, "EIO");
    }

    #[test]
    #[allow(deprecated)] // the 1.x API stays until 2.0
    fn kind_names_round_trip_and_unknown_is_safe() {
        for n in 1..=10 {
            let k = ErrorKind(n);
            assert_eq!(ErrorKind::from_name(k.as_str()), Some(k));
        }
        assert_eq!(ErrorKind(999).as_str(), "unknown");
        assert_eq!(ErrorKind::from_name("unknown"), None);
    }

    #[test]
    fn io_errors_map_to_kinds() {
        let e = std::io::Error::from(std::io::ErrorKind::NotFound);
        let d = DriverError::io("opening \"/x\"", &e);
        assert_eq!(d.kind(), ErrorKind::NOT_FOUND);
        assert!(d.message().starts_with("opening \"/x\": "));
    }
}
