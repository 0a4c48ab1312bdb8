//! Configuration of the Kafka exporter: its flags and `OMEGI_*` variables,
//! checked once at start like the rest of [`config`](crate::config).

use std::time::Duration;

use clap::Args;

use crate::config::ConfigError;

/// Prefix of the variables passed through to librdkafka.
pub const CLIENT_CONFIG_PREFIX: &str = "OMEGI_KAFKA_CONFIG_";

/// The Kafka exporter's flags (each also an `OMEGI_*` variable).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Kafka exporter (--exporter kafka)")]
pub struct KafkaArgs {
    /// Kafka brokers to start from: comma-separated HOST:PORT (port 9092 when
    /// left out).
    #[arg(
        long,
        env = "OMEGI_KAFKA_SERVER",
        default_value = "localhost:9092",
        value_name = "HOST:PORT,..."
    )]
    pub kafka_server: String,

    /// Topic that receives every trace holding an error.
    #[arg(
        long,
        env = "OMEGI_KAFKA_TOPIC_ERROR",
        default_value = "error",
        value_name = "TOPIC"
    )]
    pub kafka_topic_error: String,

    /// Topic that receives one record per sampled trace (1 in OMEGI_FLOW_RATE).
    #[arg(
        long,
        env = "OMEGI_KAFKA_TOPIC_FLOW",
        default_value = "flow",
        value_name = "TOPIC"
    )]
    pub kafka_topic_flow: String,

    /// The token issued when the service was registered on the Omegi web page
    /// (sent in every message's `token` field).
    #[arg(
        long,
        env = "OMEGI_TOKEN",
        default_value = "",
        hide_default_value = true,
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: String,

    /// Create the two topics at start (and again if they disappear) when the
    /// broker does not have them: true or false.
    #[arg(
        long,
        env = "OMEGI_KAFKA_CREATE_TOPICS",
        default_value = "true",
        value_name = "BOOL"
    )]
    pub kafka_create_topics: String,

    /// A trace that could not be delivered is retried, with backoff, for this
    /// long; then it is dropped and counted.
    #[arg(
        long,
        env = "OMEGI_KAFKA_RETRY_TIMEOUT",
        default_value = "5m",
        value_name = "DURATION"
    )]
    pub kafka_retry_timeout: String,

    /// A librdkafka client property, e.g. security.protocol=SASL_SSL
    /// (repeatable; also OMEGI_KAFKA_CONFIG_<KEY> variables, e.g.
    /// OMEGI_KAFKA_CONFIG_SECURITY_PROTOCOL).
    #[arg(long = "kafka-config", value_name = "KEY=VALUE")]
    pub kafka_config: Vec<String>,
}

/// One librdkafka property and where it came from (for error messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientProperty {
    pub key: String,
    pub value: String,
    /// `OMEGI_KAFKA_CONFIG_SECURITY_PROTOCOL` or `--kafka-config`.
    pub source: String,
}

/// The checked settings of the Kafka exporter.
#[derive(Clone, Debug)]
pub struct KafkaOptions {
    /// `host:port` entries, as given.
    pub servers: Vec<String>,
    pub topic_error: String,
    pub topic_flow: String,
    pub token: String,
    pub create_topics: bool,
    pub retry_timeout: Duration,
    /// Passed to librdkafka after omegi's own settings, so they win.
    pub client_config: Vec<ClientProperty>,
}

impl KafkaOptions {
    /// Checks the flags and the `OMEGI_KAFKA_CONFIG_*` variables in `env`.
    pub fn from_args<I>(args: &KafkaArgs, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        Ok(Self {
            servers: parse_servers(&args.kafka_server)?,
            topic_error: parse_topic(
                "OMEGI_KAFKA_TOPIC_ERROR (--kafka-topic-error)",
                &args.kafka_topic_error,
            )?,
            topic_flow: parse_topic(
                "OMEGI_KAFKA_TOPIC_FLOW (--kafka-topic-flow)",
                &args.kafka_topic_flow,
            )?,
            token: args.token.trim().to_owned(),
            create_topics: parse_bool(
                "OMEGI_KAFKA_CREATE_TOPICS (--kafka-create-topics)",
                &args.kafka_create_topics,
            )?,
            retry_timeout: crate::config::parse_duration(
                "OMEGI_KAFKA_RETRY_TIMEOUT (--kafka-retry-timeout)",
                &args.kafka_retry_timeout,
            )?,
            client_config: parse_client_config(env, &args.kafka_config)?,
        })
    }

    /// The value of `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.servers.join(",")
    }

    /// A passed-through property's value, if set.
    pub fn client_property(&self, key: &str) -> Option<&str> {
        self.client_config
            .iter()
            .rev()
            .find(|property| property.key == key)
            .map(|property| property.value.as_str())
    }
}

fn error(name: &'static str, value: &str, expected: impl Into<String>) -> ConfigError {
    ConfigError {
        name,
        value: value.into(),
        expected: expected.into(),
    }
}

/// `OMEGI_KAFKA_SERVER`: comma-separated `host[:port]` entries; a host may be
/// a name, an IPv4 address or a bracketed IPv6 address, and an entry may
/// start with a librdkafka protocol prefix (`SSL://`…).
pub fn parse_servers(value: &str) -> Result<Vec<String>, ConfigError> {
    const NAME: &str = "OMEGI_KAFKA_SERVER (--kafka-server)";
    const EXPECTED: &str = "a comma-separated list of host:port, e.g. kafka-1:9092,kafka-2:9092";
    let fail = |why: String| error(NAME, value, format!("{EXPECTED} ({why})"));
    let mut servers = Vec::new();
    for entry in value.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(fail("an entry is empty".into()));
        }
        let address = match entry.split_once("://") {
            Some((scheme, rest)) => {
                let known = ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];
                if !known.iter().any(|known| known.eq_ignore_ascii_case(scheme)) {
                    return Err(fail(format!("unknown protocol {scheme:?} in {entry:?}")));
                }
                rest
            }
            None => entry,
        };
        let (host, port) = if let Some(rest) = address.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| fail(format!("{entry:?} has no closing ]")))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(fail(format!("{entry:?} is not host:port"))),
                },
            }
        } else {
            match address.rsplit_once(':') {
                Some((host, _)) if host.contains(':') => {
                    return Err(fail(format!(
                        "{entry:?}: write an IPv6 address in brackets, [::1]:9092"
                    )))
                }
                Some((host, port)) => (host, Some(port)),
                None => (address, None),
            }
        };
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
        if !host_ok {
            return Err(fail(format!("{entry:?} has no valid host")));
        }
        if let Some(port) = port {
            match port.parse::<u16>() {
                Ok(port) if port > 0 => {}
                _ => return Err(fail(format!("{port:?} is not a port number (1-65535)"))),
            }
        }
        servers.push(entry.to_owned());
    }
    Ok(servers)
}

/// A Kafka topic name: 1 to 249 of `a-z A-Z 0-9 . _ -`, not `.` or `..`.
pub fn parse_topic(name: &'static str, value: &str) -> Result<String, ConfigError> {
    let topic = value.trim();
    let valid = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(topic.to_owned())
    } else {
        Err(error(
            name,
            value,
            "a Kafka topic name: 1 to 249 letters, digits, '.', '_' or '-'",
        ))
    }
}

/// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
pub fn parse_bool(name: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(error(name, value, "true or false")),
    }
}

/// The librdkafka property an `OMEGI_KAFKA_CONFIG_<KEY>` variable sets:
/// `<KEY>` lowercased, each `_` a `.`, and `__` a literal `_`
/// (`SECURITY_PROTOCOL` → `security.protocol`).
pub fn property_of_variable(key: &str) -> String {
    key.to_ascii_lowercase()
        .replace("__", "\0")
        .replace('_', ".")
        .replace('\0', "_")
}

/// The passed-through librdkafka properties: `OMEGI_KAFKA_CONFIG_*`
/// variables (in name order), then `--kafka-config KEY=VALUE` flags, so that
/// a flag wins. Each is checked by librdkafka itself.
pub fn parse_client_config<I>(env: I, flags: &[String]) -> Result<Vec<ClientProperty>, ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut from_env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with("OMEGI_KAFKA_CONFIG"))
        .collect();
    from_env.sort();
    let mut properties = Vec::new();
    for (name, value) in from_env {
        let Some(key) = name.strip_prefix(CLIENT_CONFIG_PREFIX) else {
            // `OMEGI_KAFKA_CONFIG` alone: the Python library's README used it
            // for the broker list by mistake.
            return Err(error(
                "OMEGI_KAFKA_CONFIG",
                &value,
                "not a setting: brokers go in OMEGI_KAFKA_SERVER, librdkafka properties in \
                 OMEGI_KAFKA_CONFIG_<KEY> (e.g. OMEGI_KAFKA_CONFIG_SECURITY_PROTOCOL)",
            ));
        };
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(error(
                leak(name.clone()),
                &value,
                "OMEGI_KAFKA_CONFIG_<KEY> with KEY of letters, digits and '_', e.g. \
                 OMEGI_KAFKA_CONFIG_SECURITY_PROTOCOL for security.protocol",
            ));
        }
        properties.push(ClientProperty {
            key: property_of_variable(key),
            value,
            source: name,
        });
    }
    for flag in flags {
        let Some((key, value)) = flag.split_once('=') else {
            return Err(error(
                "--kafka-config",
                flag,
                "KEY=VALUE with a librdkafka property, e.g. security.protocol=SASL_SSL",
            ));
        };
        properties.push(ClientProperty {
            key: key.trim().to_owned(),
            value: value.to_owned(),
            source: "--kafka-config".into(),
        });
    }
    for property in &properties {
        check_property(property)?;
    }
    Ok(properties)
}

/// Properties omegi sets from its own variables.
const OWN_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "OMEGI_KAFKA_SERVER"),
    ("metadata.broker.list", "OMEGI_KAFKA_SERVER"),
];

fn check_property(property: &ClientProperty) -> Result<(), ConfigError> {
    let name = leak(format!("{} ({})", property.source, property.key));
    if let Some((_, variable)) = OWN_PROPERTIES.iter().find(|(key, _)| *key == property.key) {
        return Err(error(
            name,
            &property.value,
            format!("omegi sets {} from {variable}: use that", property.key),
        ));
    }
    let mut config = rdkafka::ClientConfig::new();
    config.set(&property.key, &property.value);
    match config.create_native_config() {
        Ok(_) => Ok(()),
        Err(rdkafka::error::KafkaError::ClientConfig(_, description, _, _)) => Err(error(
            name,
            &property.value,
            format!("a librdkafka client property and value (librdkafka: {description})"),
        )),
        Err(other) => Err(error(
            name,
            &property.value,
            format!("a librdkafka client property and value ({other})"),
        )),
    }
}

/// Error names are `&'static str`; a name built at run time lives until the
/// agent exits on that error.
fn leak(name: String) -> &'static str {
    Box::leak(name.into_boxed_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists() {
        assert_eq!(
            parse_servers("localhost:9092").unwrap(),
            vec!["localhost:9092"]
        );
        assert_eq!(
            parse_servers(" kafka-1:9092, kafka-2 ,10.0.0.3:19092,[::1]:9093,SSL://k:9094")
                .unwrap(),
            vec![
                "kafka-1:9092",
                "kafka-2",
                "10.0.0.3:19092",
                "[::1]:9093",
                "SSL://k:9094"
            ]
        );
        for bad in [
            "host:notaport",
            ":9092",
            "",
            "a:9092,,b:9092",
            "a:9092,",
            "host:0",
            "host:65536",
            "host:",
            "::1:9092",
            "ftp://host:1",
            "bad host:9092",
        ] {
            let message = parse_servers(bad).unwrap_err().to_string();
            assert!(
                message.starts_with("OMEGI_KAFKA_SERVER (--kafka-server) = "),
                "{message}"
            );
            assert!(message.contains("host:port"), "{message}");
        }
        assert!(parse_servers("host:notaport")
            .unwrap_err()
            .to_string()
            .contains("\"notaport\" is not a port"));
    }

    #[test]
    fn topics() {
        assert_eq!(parse_topic("T", "error").unwrap(), "error");
        assert_eq!(
            parse_topic("T", "omegi.flow-2_x").unwrap(),
            "omegi.flow-2_x"
        );
        for bad in ["", "  ", ".", "..", "a b", "a/b", &"x".repeat(250)] {
            let message = parse_topic("OMEGI_KAFKA_TOPIC_ERROR (--kafka-topic-error)", bad)
                .unwrap_err()
                .to_string();
            assert!(message.contains("OMEGI_KAFKA_TOPIC_ERROR"), "{message}");
            assert!(message.contains("topic name"), "{message}");
        }
    }

    #[test]
    fn bools() {
        assert!(parse_bool("B", "true").unwrap());
        assert!(parse_bool("B", "ON").unwrap());
        assert!(!parse_bool("B", "false").unwrap());
        assert!(!parse_bool("B", "0").unwrap());
        assert!(parse_bool("B", "maybe").is_err());
    }

    #[test]
    fn variable_names_map_to_librdkafka_properties() {
        assert_eq!(
            property_of_variable("SECURITY_PROTOCOL"),
            "security.protocol"
        );
        assert_eq!(property_of_variable("SASL_MECHANISMS"), "sasl.mechanisms");
        assert_eq!(
            property_of_variable("MESSAGE_TIMEOUT_MS"),
            "message.timeout.ms"
        );
        assert_eq!(property_of_variable("SOME__ODD_KEY"), "some_odd.key");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn client_config_passes_through_and_flags_win() {
        let properties = parse_client_config(
            env(&[
                ("OMEGI_KAFKA_CONFIG_SECURITY_PROTOCOL", "SASL_SSL"),
                ("OMEGI_KAFKA_CONFIG_COMPRESSION_TYPE", "gzip"),
                ("PATH", "/bin"),
                ("OMEGI_KAFKA_SERVER", "x:1"),
            ]),
            &["compression.type=lz4".into()],
        )
        .unwrap();
        let keys: Vec<_> = properties
            .iter()
            .map(|p| (p.key.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("compression.type", "gzip"),
                ("security.protocol", "SASL_SSL"),
                ("compression.type", "lz4"),
            ]
        );
        let options = KafkaOptions {
            servers: vec![],
            topic_error: "e".into(),
            topic_flow: "f".into(),
            token: String::new(),
            create_topics: true,
            retry_timeout: Duration::ZERO,
            client_config: properties,
        };
        assert_eq!(options.client_property("compression.type"), Some("lz4"));
    }

    #[test]
    fn bad_client_config_names_the_variable() {
        let message = parse_client_config(
            env(&[("OMEGI_KAFKA_CONFIG_SECURITY_PROTOCOL", "bogus")]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            message.starts_with(
                "OMEGI_KAFKA_CONFIG_SECURITY_PROTOCOL (security.protocol) = \"bogus\""
            ),
            "{message}"
        );
        let message = parse_client_config(env(&[("OMEGI_KAFKA_CONFIG_NO_SUCH_THING", "1")]), &[])
            .unwrap_err()
            .to_string();
        assert!(message.contains("no.such.thing"), "{message}");
        let message = parse_client_config(env(&[("OMEGI_KAFKA_CONFIG", "a:1,b:2")]), &[])
            .unwrap_err()
            .to_string();
        assert!(message.contains("OMEGI_KAFKA_SERVER"), "{message}");
        let message =
            parse_client_config(env(&[("OMEGI_KAFKA_CONFIG_BOOTSTRAP_SERVERS", "a:1")]), &[])
                .unwrap_err()
                .to_string();
        assert!(message.contains("use that"), "{message}");
        assert!(parse_client_config(vec![], &["novalue".into()]).is_err());
        assert!(parse_client_config(env(&[("OMEGI_KAFKA_CONFIG_", "1")]), &[]).is_err());
    }
}

#[cfg(test)]
mod librdkafka_build {
    /// What the README promises of omegi's librdkafka build.
    #[test]
    fn builtin_features() {
        let features = rdkafka::ClientConfig::new()
            .create_native_config()
            .unwrap()
            .get("builtin.features")
            .unwrap();
        let features: Vec<&str> = features.split(',').collect();
        for wanted in [
            "ssl",
            "sasl_plain",
            "sasl_scram",
            "sasl_oauthbearer",
            "gzip",
            "snappy",
            "lz4",
        ] {
            assert!(features.contains(&wanted), "{wanted} not in {features:?}");
        }
        eprintln!("librdkafka builtin.features: {features:?}");
    }
}
