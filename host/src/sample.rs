//! `plughost config sample`: a commented TOML configuration generated from drivers' option schemas.
//! Every option line is valid TOML once uncommented: defaults as typed values, options without one as
//! a placeholder of the right type, marked `required` where the driver says so.

use plughost_api::{OptionSpec, OptionType};

use crate::loader::Library;

/// A TOML value for an option's default, as the user would write it.
fn toml_value(ty: OptionType, text: &str) -> String {
    match ty {
        OptionType::INTEGER | OptionType::BOOL if !text.is_empty() => {
            plughost_api::normalize_value(ty, text).unwrap_or_else(|_| format!("{text:?}"))
        }
        _ => format!("{text:?}"),
    }
}

/// A placeholder of the right type for an option without a default.
fn placeholder(ty: OptionType) -> &'static str {
    match ty {
        OptionType::INTEGER => "0",
        OptionType::BOOL => "false",
        OptionType::SIZE => "\"10GiB\"",
        OptionType::PATH => "\"/path\"",
        _ => "\"...\"",
    }
}

fn option_lines(o: &OptionSpec, out: &mut String) {
    let mut flags = vec![o.ty().as_str().to_owned()];
    if o.is_required() {
        flags.push("required".to_owned());
    }
    if o.is_secret() {
        flags.push("secret: never logged or shown".to_owned());
    }
    out.push_str(&format!("# {} ({})\n", o.help(), flags.join(", ")));
    match o.default_value() {
        Some(v) if !o.is_secret() => out.push_str(&format!("# {} = {}\n", o.name(), toml_value(o.ty(), v))),
        _ => out.push_str(&format!("# {} = {}\n", o.name(), placeholder(o.ty()))),
    }
}

/// The sample configuration for these drivers.
pub fn sample(drivers: &[Library]) -> String {
    let mut out = String::from(
        "# plughost sample configuration, generated from the drivers' option schemas.\n\
         # Precedence: command line > environment (PLUGHOST_*) > this file > defaults.\n\n\
         # state_dir = \"/var/lib/plughost\"\n# socket = \"/var/lib/plughost/plughost.sock\"\n\
         # driver_dirs = [\"/usr/lib/plughost/drivers\"]\n# shutdown_timeout_ms = 10000\n\
         # periodic_interval_ms = 10000\n# max_request_bytes = 1048576\n",
    );
    for lib in drivers {
        out.push_str(&format!(
            "\n# {} {}: {}\n[{}]\ndriver = {:?}\n",
            lib.name(),
            lib.version(),
            lib.summary(),
            lib.kind(),
            lib.name(),
        ));
        let kind = crate::services::kind(lib.kind().as_str());
        if kind.is_some_and(|k| k.settings.contains(&"stop_instances_on_exit")) {
            out.push_str(
                "# Stop this service's instances when plughost stops (host setting; by default they keep\n\
                 # running and the next start re-adopts them)\n# stop_instances_on_exit = false\n",
            );
        }
        out.push_str(&format!("[{}.options]\n", lib.kind()));
        for o in lib.options() {
            option_lines(o, &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_line_is_valid_toml_once_uncommented() {
        const SCHEMA: &[OptionSpec] = &[
            OptionSpec::path("root", "where").required(),
            OptionSpec::size("max", "largest").default("1GiB"),
            OptionSpec::boolean("sync", "fsync").default("yes"),
            OptionSpec::integer("n", "count"),
            OptionSpec::string("token", "secret").secret().default("hunter2"),
        ];
        let mut out = String::new();
        for o in SCHEMA {
            option_lines(o, &mut out);
        }
        assert!(!out.contains("hunter2"), "{out}");
        let uncommented: String =
            out.lines().filter(|l| l.contains(" = ")).map(|l| format!("{}\n", l.trim_start_matches("# "))).collect();
        let table: toml::Table = toml::from_str(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert_eq!(table["sync"].as_bool(), Some(true));
        assert_eq!(table["n"].as_integer(), Some(0));
        assert_eq!(table["max"].as_str(), Some("1GiB"));
        assert!(out.contains("(path, required)"), "{out}");
    }
}
