//! The `limits:` section (issue 22): per-source rate limits, off by default. Live on SIGHUP.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::ConfigError;

/// A source's limit: at most this many envelopes and bytes a second, with a burst of
/// `burst_seconds` worth of either.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub envelopes_per_second: Option<f64>,
    pub bytes_per_second: Option<f64>,
    pub burst_seconds: f64,
}

/// `limits:` as validated.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Every source's limit (`None`: sources are not limited, overrides aside).
    pub per_source: Option<Limit>,
    /// Limits for named sources, replacing `per_source`'s (a field left out keeps its value).
    pub overrides: BTreeMap<String, Limit>,
    /// Sources never limited (platform components, say).
    pub exempt: BTreeSet<String>,
    /// How many of the heaviest sources `/metrics`, `/readyz` and the state dump name.
    pub top_sources: usize,
}

/// The most sources the heaviest sources' report names.
pub const MAX_TOP_SOURCES: usize = 20;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_source: None,
            overrides: BTreeMap::new(),
            exempt: BTreeSet::new(),
            top_sources: 10,
        }
    }
}

impl LimitsConfig {
    /// Whether any source is limited.
    pub fn enabled(&self) -> bool {
        self.per_source.is_some() || !self.overrides.is_empty()
    }

    /// `source`'s limit, if it has one.
    pub fn limit_of(&self, source: &str) -> Option<Limit> {
        if self.exempt.contains(source) {
            return None;
        }
        self.overrides.get(source).copied().or(self.per_source)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    #[serde(default)]
    per_source: Option<RawLimit>,
    #[serde(default)]
    overrides: BTreeMap<String, RawLimit>,
    #[serde(default)]
    exempt: Vec<String>,
    #[serde(default)]
    top_sources: Option<usize>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    #[serde(default)]
    envelopes_per_second: Option<f64>,
    #[serde(default)]
    bytes_per_second: Option<f64>,
    #[serde(default)]
    burst_seconds: Option<f64>,
}

/// A second's worth of burst, unless told.
const DEFAULT_BURST_SECONDS: f64 = 1.0;

impl RawLimit {
    fn validate(&self, key: &str, base: Option<&RawLimit>) -> Result<Limit, ConfigError> {
        let pick = |own: Option<f64>, base: Option<f64>| own.or(base);
        let envelopes = pick(
            self.envelopes_per_second,
            base.and_then(|b| b.envelopes_per_second),
        );
        let bytes = pick(self.bytes_per_second, base.and_then(|b| b.bytes_per_second));
        let burst = pick(self.burst_seconds, base.and_then(|b| b.burst_seconds))
            .unwrap_or(DEFAULT_BURST_SECONDS);
        for (name, v) in [
            ("envelopes_per_second", envelopes),
            ("bytes_per_second", bytes),
            ("burst_seconds", Some(burst)),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(ConfigError::new(
                        format!("{key}.{name}"),
                        format!("{v}: must be a positive number"),
                    ));
                }
            }
        }
        if let Some(e) = envelopes {
            if e * burst < 1.0 {
                return Err(ConfigError::new(
                    format!("{key}.burst_seconds"),
                    format!(
                        "{burst}: at {e} envelopes/s the burst must hold at least one envelope \
                         (burst_seconds ≥ {})",
                        1.0 / e
                    ),
                ));
            }
        }
        if envelopes.is_none() && bytes.is_none() {
            return Err(ConfigError::new(
                key,
                "needs envelopes_per_second, bytes_per_second or both",
            ));
        }
        Ok(Limit {
            envelopes_per_second: envelopes,
            bytes_per_second: bytes,
            burst_seconds: burst,
        })
    }
}

impl RawLimits {
    pub(super) fn validate(self) -> Result<LimitsConfig, ConfigError> {
        let per_source = self
            .per_source
            .as_ref()
            .map(|l| l.validate("limits.per_source", None))
            .transpose()?;
        let mut overrides = BTreeMap::new();
        for (source, l) in &self.overrides {
            if source.is_empty() {
                return Err(ConfigError::new("limits.overrides", "an empty source id"));
            }
            let limit = l.validate(
                &format!("limits.overrides.{source}"),
                self.per_source.as_ref(),
            )?;
            overrides.insert(source.clone(), limit);
        }
        let top_sources = self.top_sources.unwrap_or(10);
        if !(1..=MAX_TOP_SOURCES).contains(&top_sources) {
            return Err(ConfigError::new(
                "limits.top_sources",
                format!("{top_sources}: from 1 to {MAX_TOP_SOURCES}"),
            ));
        }
        Ok(LimitsConfig {
            per_source,
            overrides,
            exempt: self.exempt.into_iter().collect(),
            top_sources,
        })
    }
}
