//! The `fly-replay` response header and the `fly-replay-src` request header
//! Fly Proxy adds to a replayed request. Fields are `key=value` pairs
//! separated by `;` (sometimes `,`: both are accepted).
//!
//! tenantd counts hops in the opaque `state` field (`state=hops-N`) so that
//! machines with stale views cannot bounce a request between them forever.

pub const FLY_REPLAY: &str = "fly-replay";
pub const FLY_REPLAY_SRC: &str = "fly-replay-src";
/// Request header of a replay that came back to its sender (`fallback=`).
pub const FLY_REPLAY_FAILED: &str = "fly-replay-failed";
/// How long Fly Proxy may try a named machine (starting it if stopped)
/// before it hands the request back with `fly-replay-failed`, instead of
/// answering the client with a generic error after its own, longer, time.
pub const REPLAY_TIMEOUT: &str = "5s";
/// Hop counter header used in `--replay-mode forward`.
pub const FORWARD_HOPS: &str = "x-tenantd-hops";

/// Most times one request may be handed from machine to machine.
pub const MAX_HOPS: u32 = 4;

/// Parses `k=v;k=v` (or `,`-separated) into pairs; unknown keys are kept.
pub fn parse_fields(value: &str) -> Vec<(String, String)> {
    value
        .split([';', ','])
        .filter_map(|part| {
            let part = part.trim();
            let (k, v) = part.split_once('=')?;
            Some((
                k.trim().to_ascii_lowercase(),
                v.trim().trim_matches('"').to_string(),
            ))
        })
        .collect()
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// What a `fly-replay-src` header says about where a request came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplaySource {
    pub instance: Option<String>,
    pub hops: u32,
}

impl ReplaySource {
    pub fn parse(value: &str) -> ReplaySource {
        let fields = parse_fields(value);
        let hops = field(&fields, "state")
            .and_then(|s| s.strip_prefix("hops-"))
            .and_then(|n| n.parse().ok())
            // A replay from a sender that does not count still is one hop.
            .unwrap_or(1);
        ReplaySource {
            instance: field(&fields, "instance").map(str::to_string),
            hops,
        }
    }
}

/// A `fly-replay` target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Instance(String),
    Elsewhere,
}

/// The `fly-replay` value sending a request (which has made `hops` hops so
/// far) to `target`.
pub fn replay_header(target: &Target, hops: u32) -> String {
    let state = format!("state=hops-{}", hops + 1);
    match target {
        Target::Instance(id) => {
            format!("instance={id};timeout={REPLAY_TIMEOUT};fallback=prefer_self;{state}")
        }
        Target::Elsewhere => format!("elsewhere=true;{state}"),
    }
}

/// Parses a `fly-replay` value as the dev edge proxy and tests follow it.
pub fn parse_replay(value: &str) -> Option<Target> {
    let fields = parse_fields(value);
    if let Some(id) = field(&fields, "instance") {
        return Some(Target::Instance(id.to_string()));
    }
    (field(&fields, "elsewhere") == Some("true")).then_some(Target::Elsewhere)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_header() {
        let h = replay_header(&Target::Instance("abc123".into()), 0);
        assert_eq!(parse_replay(&h), Some(Target::Instance("abc123".into())));
        assert_eq!(
            parse_replay(&replay_header(&Target::Elsewhere, 2)),
            Some(Target::Elsewhere)
        );
    }

    #[test]
    fn reads_fly_replay_src_with_either_separator() {
        let a = ReplaySource::parse("instance=00bb33ff;region=ams;t=1700000000000000;state=hops-2");
        assert_eq!(
            a,
            ReplaySource {
                instance: Some("00bb33ff".into()),
                hops: 2
            }
        );
        let b = ReplaySource::parse("instance=00bb33ff,region=ams,state=hops-3");
        assert_eq!(b.hops, 3);
        assert_eq!(ReplaySource::parse("instance=x;region=ams").hops, 1);
    }
}
