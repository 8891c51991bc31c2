//! Routing: which log topic and partition key an MQTT publish goes to. Routes are MQTT topic
//! filters tried in order; the first match wins; anything unmatched takes the default route
//! (topic `telemetry`, keyed by the MQTT topic, so one sensor's stream stays in order).
//! Partitions are chosen by `xxh3_64(key) % partitions`, written down here and pinned by a
//! golden test because changing it would reorder every keyed stream.

use std::sync::Arc;

use bytes::Bytes;

use crate::config::{DEFAULT_TOPIC, RouteSettings};
use crate::mqtt::topic::matches;
use crate::types::PartitionId;

/// One piece of a key template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Topic,
    ClientId,
    Level(usize),
}

/// A parsed partition-key template such as `{topic}`, `{2}` or `site-{1}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyTemplate(Vec<Part>);

impl KeyTemplate {
    pub fn parse(s: &str) -> Result<KeyTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| "unclosed '{'".to_string())?
                + open;
            let name = &rest[open + 1..close];
            parts.push(match name {
                "topic" => Part::Topic,
                "client_id" => Part::ClientId,
                n => match n.parse::<usize>() {
                    Ok(i) if i >= 1 => Part::Level(i),
                    _ => {
                        return Err(format!(
                            "unknown placeholder {{{n}}}; use {{topic}}, {{client_id}} or a level number {{1}}, {{2}}, ..."
                        ));
                    }
                },
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(KeyTemplate(parts))
    }

    /// Renders the key; a level past the end of the topic renders as empty.
    pub fn render(&self, topic: &str, client_id: &str) -> Bytes {
        if let [Part::Topic] = self.0.as_slice() {
            return Bytes::copy_from_slice(topic.as_bytes());
        }
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Literal(s) => out.push_str(s),
                Part::Topic => out.push_str(topic),
                Part::ClientId => out.push_str(client_id),
                Part::Level(i) => out.push_str(topic.split('/').nth(i - 1).unwrap_or("")),
            }
        }
        Bytes::from(out)
    }
}

#[derive(Clone, Debug)]
struct Route {
    filter: String,
    topic: Arc<str>,
    key: KeyTemplate,
}

/// The ordered route table plus the default route.
#[derive(Clone, Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    default: Route,
}

impl RouteTable {
    /// Builds the table from validated settings.
    pub fn new(settings: &[RouteSettings]) -> Result<RouteTable, String> {
        let routes = settings
            .iter()
            .map(|r| {
                Ok(Route {
                    filter: r.filter.clone(),
                    topic: Arc::from(r.topic.as_str()),
                    key: KeyTemplate::parse(&r.key)?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(RouteTable {
            routes,
            default: Route {
                filter: "#".into(),
                topic: Arc::from(DEFAULT_TOPIC),
                key: KeyTemplate(vec![Part::Topic]),
            },
        })
    }

    /// The log topic and partition key for a publish on `subject`.
    pub fn resolve(&self, subject: &str, client_id: &str) -> (Arc<str>, Bytes) {
        let route = self
            .routes
            .iter()
            .find(|r| matches(&r.filter, subject))
            .unwrap_or(&self.default);
        (route.topic.clone(), route.key.render(subject, client_id))
    }
}

/// The partition of `key` in a topic with `partitions` partitions.
pub fn partition_for(key: &[u8], partitions: u32) -> PartitionId {
    PartitionId((xxhash_rust::xxh3::xxh3_64(key) % u64::from(partitions.max(1))) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitioner_is_stable() {
        // Golden values: changing the partitioner moves every keyed stream.
        let got: Vec<u32> = ["sensors/1/temp", "sensors/2/temp", "", "a"]
            .iter()
            .map(|k| partition_for(k.as_bytes(), 8).0)
            .collect();
        assert_eq!(got, GOLDEN_PARTITIONS);
    }
    const GOLDEN_PARTITIONS: [u32; 4] = [2, 2, 2, 7];

    #[test]
    fn routes_first_match_then_default() {
        let t = RouteTable::new(&[
            RouteSettings {
                filter: "factory/+/temp".into(),
                topic: "temps".into(),
                key: "site-{2}".into(),
            },
            RouteSettings {
                filter: "factory/#".into(),
                topic: "factory".into(),
                key: "{client_id}".into(),
            },
        ])
        .unwrap();
        let check = |subject: &str, topic: &str, key: &str| {
            let (t2, k) = t.resolve(subject, "dev1");
            assert_eq!((&*t2, &k[..]), (topic, key.as_bytes()), "{subject}");
        };
        check("factory/a/temp", "temps", "site-a");
        check("factory/a/hum", "factory", "dev1");
        check("home/x", "telemetry", "home/x");
        check("$SYS/x", "telemetry", "$SYS/x");
    }

    #[test]
    fn key_templates() {
        assert!(KeyTemplate::parse("{topic").is_err());
        assert!(KeyTemplate::parse("{0}").is_err());
        assert_eq!(
            KeyTemplate::parse("x{9}y").unwrap().render("a/b", "c"),
            Bytes::from("xy")
        );
    }
}
