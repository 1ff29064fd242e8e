//! Driver options: the schema a driver declares, validation, and typed access.
//!
//! A driver declares its options as a `const` slice of [`OptionSpec`]. The host reads that schema before
//! running any driver code, validates what the user gave against it ([`validate`]), and passes the
//! constructor an [`Options`] holding one normalized value per option: sizes as a plain number of bytes,
//! booleans as `true`/`false`, integers in decimal. Options that were neither given nor defaulted are
//! absent.

use std::fmt;
use std::path::PathBuf;

use abi_stable::std_types::{ROption, RStr};
use abi_stable::StableAbi;

use crate::DriverError;

/// The type of an option value.
///
/// A transparent number (not a Rust `enum`) so that a type added later cannot cause undefined behaviour
/// in an older host; hosts reject unknown types as invalid metadata.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, PartialEq, Eq, Hash)]
pub struct OptionType(u8);

impl OptionType {
    /// Any UTF-8 text.
    pub const STRING: OptionType = OptionType(1);
    /// A signed 64-bit decimal integer.
    pub const INTEGER: OptionType = OptionType(2);
    /// `true`/`false` (also accepted: `yes`/`no`, `on`/`off`, `1`/`0`).
    pub const BOOL: OptionType = OptionType(3);
    /// A size in bytes, written as a number with an optional unit, see [`parse_size`].
    pub const SIZE: OptionType = OptionType(4);
    /// A filesystem path (not empty).
    pub const PATH: OptionType = OptionType(5);

    /// The name shown in option tables and sample configs.
    pub fn as_str(self) -> &'static str {
        match self.0 {
            1 => "string",
            2 => "integer",
            3 => "bool",
            4 => "size",
            5 => "path",
            _ => "unknown",
        }
    }

    /// Whether this host knows this type.
    pub fn is_known(self) -> bool {
        (1..=5).contains(&self.0)
    }
}

impl fmt::Debug for OptionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for OptionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One option a driver accepts. Built in `const` context:
///
/// ```
/// use plughost_api::OptionSpec;
/// const OPTIONS: &[OptionSpec] = &[
///     OptionSpec::path("root", "directory that holds the volume files").required(),
///     OptionSpec::size("max_size", "largest volume accepted").default("1TiB"),
///     OptionSpec::string("token", "API token").secret(),
/// ];
/// # assert_eq!(OPTIONS[1].default_value(), Some("1TiB"));
/// ```
#[repr(C)]
#[derive(StableAbi, Copy, Clone)]
pub struct OptionSpec {
    name: RStr<'static>,
    ty: OptionType,
    default: ROption<RStr<'static>>,
    required: bool,
    secret: bool,
    help: RStr<'static>,
}

impl OptionSpec {
    const fn new(name: &'static str, ty: OptionType, help: &'static str) -> OptionSpec {
        OptionSpec {
            name: RStr::from_str(name),
            ty,
            default: ROption::RNone,
            required: false,
            secret: false,
            help: RStr::from_str(help),
        }
    }
    /// A [`OptionType::STRING`] option.
    pub const fn string(name: &'static str, help: &'static str) -> OptionSpec {
        OptionSpec::new(name, OptionType::STRING, help)
    }
    /// An [`OptionType::INTEGER`] option.
    pub const fn integer(name: &'static str, help: &'static str) -> OptionSpec {
        OptionSpec::new(name, OptionType::INTEGER, help)
    }
    /// A [`OptionType::BOOL`] option.
    pub const fn boolean(name: &'static str, help: &'static str) -> OptionSpec {
        OptionSpec::new(name, OptionType::BOOL, help)
    }
    /// A [`OptionType::SIZE`] option.
    pub const fn size(name: &'static str, help: &'static str) -> OptionSpec {
        OptionSpec::new(name, OptionType::SIZE, help)
    }
    /// A [`OptionType::PATH`] option.
    pub const fn path(name: &'static str, help: &'static str) -> OptionSpec {
        OptionSpec::new(name, OptionType::PATH, help)
    }
    /// An option of any type (for hosts and tests; authors use the typed constructors).
    pub const fn of_type(name: &'static str, ty: OptionType, help: &'static str) -> OptionSpec {
        OptionSpec::new(name, ty, help)
    }
    /// Sets the default, written as a user would write it (`"10GiB"`, `"true"`).
    pub const fn default(mut self, value: &'static str) -> OptionSpec {
        self.default = ROption::RSome(RStr::from_str(value));
        self
    }
    /// Marks the option as required: the user must give it; a default is ignored.
    pub const fn required(mut self) -> OptionSpec {
        self.required = true;
        self
    }
    /// Marks the value as secret: hosts never log or display it.
    pub const fn secret(mut self) -> OptionSpec {
        self.secret = true;
        self
    }

    /// The option's name.
    pub fn name(&self) -> &'static str {
        self.name.as_str()
    }
    /// The option's type.
    pub fn ty(&self) -> OptionType {
        self.ty
    }
    /// The default value as written by the driver author.
    pub fn default_value(&self) -> Option<&'static str> {
        match self.default {
            ROption::RSome(s) => Some(s.as_str()),
            ROption::RNone => None,
        }
    }
    /// Whether the user must give the option.
    pub fn is_required(&self) -> bool {
        self.required
    }
    /// Whether the value must never be logged or shown.
    pub fn is_secret(&self) -> bool {
        self.secret
    }
    /// One line of help.
    pub fn help(&self) -> &'static str {
        self.help.as_str()
    }
}

impl fmt::Debug for OptionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OptionSpec")
            .field("name", &self.name())
            .field("ty", &self.ty)
            .field("default", &self.default_value())
            .field("required", &self.required)
            .field("secret", &self.secret)
            .field("help", &self.help())
            .finish()
    }
}

/// Parses a size: a decimal number of bytes with an optional unit.
///
/// Units (case-insensitive): `B`; binary `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`, `P`/`PiB`; decimal
/// `KB`, `MB`, `GB`, `TB`, `PB`. Spaces between number and unit are allowed. Fractions are not.
///
/// ```
/// assert_eq!(plughost_api::parse_size("10MiB"), Ok(10 << 20));
/// assert_eq!(plughost_api::parse_size("1 GB"), Ok(1_000_000_000));
/// assert!(plughost_api::parse_size("ten").is_err());
/// ```
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("bad size syntax {text:?}: expected a number with an optional unit such as 10MiB"));
    }
    let n: u64 = num.parse().map_err(|_| format!("size {text:?} is too large"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "p" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        other => {
            return Err(format!(
                "bad size syntax {text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {text:?} is too large"))
}

/// Parses a boolean as accepted for [`OptionType::BOOL`].
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(format!("expected a boolean (true/false), got {text:?}")),
    }
}

/// Checks one raw value against a type and returns its normalized text.
pub fn normalize_value(ty: OptionType, raw: &str) -> Result<String, String> {
    match ty {
        OptionType::STRING => Ok(raw.to_owned()),
        OptionType::INTEGER => {
            raw.trim().parse::<i64>().map(|n| n.to_string()).map_err(|_| format!("expected an integer, got {raw:?}"))
        }
        OptionType::BOOL => parse_bool(raw).map(|b| b.to_string()),
        OptionType::SIZE => parse_size(raw).map(|n| n.to_string()),
        OptionType::PATH => {
            if raw.is_empty() {
                Err("expected a path, got an empty value".to_owned())
            } else {
                Ok(raw.to_owned())
            }
        }
        other => Err(format!("option has unknown type {}", other.0)),
    }
}

/// Why a user-given option set was refused; one per offending option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    /// The option concerned.
    pub option: String,
    /// Why, in lowercase, no trailing period.
    pub reason: String,
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "option {:?}: {}", self.option, self.reason)
    }
}

/// Validates user-given `(key, value)` pairs against a schema.
///
/// Returns every option with a value (given or defaulted), normalized, in schema order; or every problem
/// found: unknown key, value of the wrong type, bad size syntax, required option missing, same key twice.
pub fn validate(schema: &[OptionSpec], given: &[(String, String)]) -> Result<Options, Vec<OptionError>> {
    let mut errors = Vec::new();
    for (i, (key, _)) in given.iter().enumerate() {
        if !schema.iter().any(|s| s.name() == key) {
            let known: Vec<&str> = schema.iter().map(|s| s.name()).collect();
            let reason = if known.is_empty() {
                "unknown option (this driver takes no options)".to_owned()
            } else {
                format!("unknown option (known: {})", known.join(", "))
            };
            errors.push(OptionError { option: key.clone(), reason });
        } else if given[..i].iter().any(|(k, _)| k == key) {
            errors.push(OptionError { option: key.clone(), reason: "given more than once".to_owned() });
        }
    }
    let mut values = Vec::new();
    for spec in schema {
        let given_value = given.iter().find(|(k, _)| k == spec.name()).map(|(_, v)| v.as_str());
        let raw = match (given_value, spec.default_value()) {
            (Some(v), _) => v,
            (None, _) if spec.is_required() => {
                errors
                    .push(OptionError { option: spec.name().to_owned(), reason: "required option missing".to_owned() });
                continue;
            }
            (None, Some(d)) => d,
            (None, None) => continue,
        };
        match normalize_value(spec.ty(), raw) {
            Ok(v) => values.push((spec.name().to_owned(), v)),
            Err(reason) => errors.push(OptionError { option: spec.name().to_owned(), reason }),
        }
    }
    if errors.is_empty() {
        Ok(Options { values, schema: &[] })
    } else {
        Err(errors)
    }
}

/// Expands the placeholders a host substitutes in option values (given ones and schema defaults):
/// `${state_dir}`, the host's state directory, and `${backend}`, the backend's name.
///
/// ```
/// let v = plughost_api::expand_placeholders("${state_dir}/volumes/${backend}", "/var/lib/plughost".as_ref(), "fast");
/// assert_eq!(v, "/var/lib/plughost/volumes/fast");
/// ```
pub fn expand_placeholders(value: &str, state_dir: &std::path::Path, backend: &str) -> String {
    value.replace("${state_dir}", &state_dir.display().to_string()).replace("${backend}", backend)
}

/// What a host gives a driver constructor for the options a user configured: every value and default
/// expanded ([`expand_placeholders`]), then [`validate`]d. The errors are the host's, one per problem.
/// Shared by hosts (`host::prepare_options`) and driver tests (`testing::TestHost`), so that the two agree.
#[cfg(any(feature = "host", feature = "testing"))]
pub fn prepare(
    schema: &[OptionSpec],
    given: &[(String, String)],
    state_dir: &std::path::Path,
    backend: &str,
) -> Result<Options, Vec<OptionError>> {
    let mut expanded: Vec<(String, String)> =
        given.iter().map(|(k, v)| (k.clone(), expand_placeholders(v, state_dir, backend))).collect();
    for o in schema {
        if let Some(d) = o.default_value() {
            if d.contains("${") && !expanded.iter().any(|(k, _)| k == o.name()) {
                expanded.push((o.name().to_owned(), expand_placeholders(d, state_dir, backend)));
            }
        }
    }
    validate(schema, &expanded)
}

/// Validated option values, as a driver constructor receives them.
///
/// The typed getters return the value the user gave, or else the default declared in the driver's
/// schema, so that each default is stated once, in the schema:
///
/// ```
/// use plughost_api::{OptionSpec, Options};
/// const OPTIONS: &[OptionSpec] = &[OptionSpec::size("capacity", "total space").default("1GiB")];
/// let given = Options::for_schema(OPTIONS, [("capacity", "2GiB")]);
/// assert_eq!(given.size("capacity"), Ok(2 << 30));
/// let defaulted = Options::for_schema(OPTIONS, [] as [(&str, &str); 0]);
/// assert_eq!(defaulted.size("capacity"), Ok(1 << 30));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Options {
    values: Vec<(String, String)>,
    schema: &'static [OptionSpec],
}

impl PartialEq for Options {
    fn eq(&self, other: &Options) -> bool {
        self.values == other.values
    }
}

impl Eq for Options {}

impl Options {
    /// Options from already-normalized pairs, without a schema (no defaults to fall back on).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Options {
        Options { values: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect(), schema: &[] }
    }

    /// Options from normalized pairs, falling back on `schema`'s defaults, taken as they are: nothing is
    /// validated (a missing required option is not noticed) and `${state_dir}` and `${backend}` are not
    /// expanded. For what a host would pass, use `testing::TestHost::options` (feature `testing`).
    pub fn for_schema<K: Into<String>, V: Into<String>>(
        schema: &'static [OptionSpec],
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Options {
        Options { schema, ..Options::from_pairs(pairs) }
    }

    /// Every option at its schema default, as written (nothing validated or expanded; see
    /// [`for_schema`](Self::for_schema)). For what a host would pass, use `testing::TestHost::options`.
    pub fn defaults(schema: &'static [OptionSpec]) -> Options {
        Options { values: Vec::new(), schema }
    }

    #[cfg(feature = "testing")]
    pub(crate) fn with_schema(self, schema: &'static [OptionSpec]) -> Options {
        Options { schema, ..self }
    }

    pub(crate) fn from_raw(raw: crate::RawOptions<'_>, schema: &'static [OptionSpec]) -> Options {
        Options { values: raw.iter().map(|t| (t.0.as_str().to_owned(), t.1.as_str().to_owned())).collect(), schema }
    }

    /// All `(name, normalized value)` pairs given (defaults filled in by a host's validation included).
    pub fn pairs(&self) -> &[(String, String)] {
        &self.values
    }

    /// The normalized text of an option, or its schema default; `None` when it has neither.
    pub fn get(&self, name: &str) -> Option<&str> {
        match self.values.iter().find(|(k, _)| k == name) {
            Some((_, v)) => Some(v.as_str()),
            None => self.schema.iter().find(|s| s.name() == name).and_then(|s| s.default_value()),
        }
    }

    fn typed<T>(&self, name: &str, ty: OptionType, f: impl Fn(&str) -> Result<T, String>) -> Result<T, DriverError> {
        let raw = self
            .get(name)
            .ok_or_else(|| DriverError::invalid_argument(format!("option {name:?} has no value and no default")))?;
        f(raw).map_err(|reason| DriverError::invalid_argument(format!("option {name:?} ({ty}): {reason}")))
    }

    /// A string option.
    pub fn string(&self, name: &str) -> Result<String, DriverError> {
        self.typed(name, OptionType::STRING, |v| Ok(v.to_owned()))
    }
    /// An integer option.
    pub fn integer(&self, name: &str) -> Result<i64, DriverError> {
        self.typed(name, OptionType::INTEGER, |v| {
            v.trim().parse().map_err(|_| format!("expected an integer, got {v:?}"))
        })
    }
    /// A boolean option; one with neither a value nor a default is `false`.
    pub fn boolean(&self, name: &str) -> Result<bool, DriverError> {
        match self.get(name) {
            None => Ok(false),
            Some(_) => self.typed(name, OptionType::BOOL, parse_bool),
        }
    }
    /// A size option, in bytes.
    pub fn size(&self, name: &str) -> Result<u64, DriverError> {
        self.typed(name, OptionType::SIZE, parse_size)
    }
    /// A path option.
    pub fn path(&self, name: &str) -> Result<PathBuf, DriverError> {
        self.typed(name, OptionType::PATH, |v| Ok(PathBuf::from(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &[OptionSpec] = &[
        OptionSpec::path("root", "where").required(),
        OptionSpec::size("max", "largest").default("1GiB"),
        OptionSpec::boolean("sync", "fsync"),
        OptionSpec::integer("n", "count").default("3"),
        OptionSpec::string("token", "secret").secret(),
    ];

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("10 MiB"), Ok(10 << 20));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert!(parse_size("").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999P").unwrap_err().contains("too large"));
        assert!(parse_size("3 bananas").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn validate_normalizes_and_applies_defaults() {
        let o = validate(SCHEMA, &pairs(&[("root", "/tmp/x"), ("sync", "yes")])).expect("valid");
        assert_eq!(o.get("max"), Some("1073741824"));
        assert_eq!(o.size("max").expect("size"), 1 << 30);
        assert!(o.boolean("sync").expect("bool"));
        assert_eq!(o.integer("n").expect("int"), 3);
        assert_eq!(o.get("token"), None);
        assert!(o.string("token").is_err());
        assert_eq!(o.path("root").expect("path"), PathBuf::from("/tmp/x"));
    }

    #[test]
    fn validate_reports_every_problem() {
        let errs = validate(SCHEMA, &pairs(&[("bogus", "1"), ("max", "lots"), ("n", "x"), ("n", "4")])).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 5, "{text:?}");
        assert!(text.iter().any(|t| t.starts_with("option \"bogus\": unknown option")));
        assert!(text.iter().any(|t| t == "option \"n\": given more than once"));
        assert!(text.iter().any(|t| t == "option \"root\": required option missing"));
        assert!(text.iter().any(|t| t.starts_with("option \"max\": bad size syntax")));
        assert!(text.iter().any(|t| t.starts_with("option \"n\": expected an integer")));
    }

    #[test]
    fn getters_fall_back_on_the_schema_default() {
        let o = Options::for_schema(SCHEMA, [("root", "/r")]);
        assert_eq!(o.size("max"), Ok(1 << 30));
        assert_eq!(o.integer("n"), Ok(3));
        assert_eq!(o.boolean("sync"), Ok(false));
        assert_eq!(o.path("root"), Ok(PathBuf::from("/r")));
        let e = o.string("token").unwrap_err();
        assert_eq!(e.message(), "option \"token\" has no value and no default");
        let bad = Options::for_schema(SCHEMA, [("n", "x")]);
        assert_eq!(bad.integer("n").unwrap_err().message(), "option \"n\" (integer): expected an integer, got \"x\"");
    }
}
