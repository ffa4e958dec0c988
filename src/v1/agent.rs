//! What the upstream agent does to a v1 envelope before it is converted: its source id and the
//! VM's identity. Without this a dropsonde emitter's envelopes reach Doppler with `source_id` `/`
//! and empty `deployment`, `job`, `index` and `ip` tags.

use crate::config::Identity;
use crate::proto;
use crate::proto_v1::Envelope;

/// The agent's own identity, as upstream's v1 tagger writes it into v1 envelopes that lack it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct V1Identity {
    pub deployment: String,
    pub job: String,
    pub index: String,
    pub ip: String,
}

impl From<&Identity> for V1Identity {
    fn from(id: &Identity) -> Self {
        Self {
            deployment: id.deployment.clone(),
            job: id.job.clone(),
            index: id.index.clone(),
            ip: id.ip.clone(),
        }
    }
}

/// Applies the upstream agent's v1 rules to a decoded (and validated) envelope, in upstream's
/// order:
/// 1. the tag `source_id` becomes the envelope's `origin` when it is missing or empty
///    (loggregator-agent-release `src/pkg/ingress/v1/event_unmarshaller.go`);
/// 2. `deployment`, `job`, `index` and `ip` become the agent's own (`id`) when unset
///    (`src/pkg/egress/v1/tagger.go`). Upstream fills only fields absent from the wire; here a
///    field sent empty counts as unset too, since an empty identity is never what an emitter
///    means.
///
/// So the conversion that follows ([`super::into_v2`]) takes the source id from the tag, never
/// from `deployment/job`, and writes the VM's identity into the identity tags.
pub fn apply_agent_rules(e: &mut Envelope, id: &V1Identity) {
    let source_id = e.tags.entry("source_id".to_owned()).or_default();
    if source_id.is_empty() {
        source_id.clone_from(e.origin.as_ref().unwrap_or(&String::new()));
    }
    for (field, own) in [
        (&mut e.deployment, &id.deployment),
        (&mut e.job, &id.job),
        (&mut e.index, &id.index),
        (&mut e.ip, &id.ip),
    ] {
        if field.as_deref().is_none_or(str::is_empty) {
            *field = Some(own.clone());
        }
    }
}

/// The v2 envelope the agent makes of a decoded v1 envelope: [`apply_agent_rules`], then
/// go-loggregator's `ToV2` ([`super::into_v2`]).
pub fn agent_to_v2(mut e: Envelope, id: &V1Identity) -> proto::Envelope {
    apply_agent_rules(&mut e, id);
    super::into_v2(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto_v1::envelope::EventType;
    use crate::proto_v1::ValueMetric;

    fn id() -> V1Identity {
        V1Identity {
            deployment: "cf".into(),
            job: "diego-cell".into(),
            index: "0".into(),
            ip: "10.0.0.5".into(),
        }
    }

    fn metric(origin: &str) -> Envelope {
        Envelope {
            origin: Some(origin.into()),
            event_type: Some(EventType::ValueMetric as i32),
            value_metric: Some(ValueMetric {
                name: Some("m".into()),
                value: Some(1.0),
                unit: Some("u".into()),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_envelope_without_identity_takes_the_agents_and_its_origin_as_source_id() {
        let v2 = agent_to_v2(metric("rep"), &id());
        assert_eq!(v2.source_id, "rep");
        for (k, v) in [
            ("deployment", "cf"),
            ("job", "diego-cell"),
            ("index", "0"),
            ("ip", "10.0.0.5"),
            ("origin", "rep"),
        ] {
            assert_eq!(v2.tags[k], v, "{k}");
        }
        assert!(!v2.tags.contains_key("source_id"));
    }

    #[test]
    fn its_own_identity_and_source_id_are_kept_and_empty_ones_are_unset() {
        let mut e = metric("rep");
        e.deployment = Some("other".into());
        e.job = Some(String::new());
        e.tags.insert("source_id".into(), "mine".into());
        let v2 = agent_to_v2(e, &id());
        assert_eq!(v2.source_id, "mine");
        assert_eq!(v2.tags["deployment"], "other");
        assert_eq!(v2.tags["job"], "diego-cell", "sent empty: unset");

        let mut e = metric("rep");
        e.tags.insert("source_id".into(), String::new());
        assert_eq!(agent_to_v2(e, &id()).source_id, "rep", "an empty tag too");
    }
}
