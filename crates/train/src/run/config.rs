//! Run configs: TOML files whose unknown keys and out-of-range values are errors naming the
//! file, hashed (sha256 of the canonical JSON) so a checkpoint resumes only under the config
//! that wrote it. Both stages' configs implement [`RunConfig`]; the LoRA section is shared.

use crate::error::{file_err, invalid, Error, Result};
use search_r3_model::{LoraConfig, LoraTarget};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A stage's run config: TOML in, validated, hashed.
pub trait RunConfig: Serialize + DeserializeOwned {
    /// Checks every field's range.
    fn validate(&self) -> Result<()>;

    /// Parses and validates TOML text; `origin` names it in errors.
    fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let at = |msg: String| Error::File {
            path: PathBuf::from(origin),
            msg,
        };
        let c: Self = toml::from_str(text).map_err(|e| at(e.to_string()))?;
        c.validate().map_err(|e| at(e.to_string()))?;
        Ok(c)
    }

    /// Reads a TOML file (see [`RunConfig::from_toml`]).
    fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// sha256 (hex) of the canonical JSON; a checkpoint resumes only under the same hash.
    fn hash(&self) -> String {
        search_r3_model::files::sha256_hex(&serde_json::to_vec(self).expect("config serialises"))
    }
}

/// LoRA settings of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSection {
    /// Rank `r` (default 16).
    pub rank: usize,
    /// Scale numerator `α`; the update is scaled by `α/r` (default 32).
    pub alpha: f64,
    /// Adapted projections (default all seven: q, k, v, o, gate, up, down).
    pub targets: Vec<LoraTarget>,
    /// Seed of the adapters' `A` initialisation (default 0; `B` starts at zero).
    pub seed: u64,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            targets: LoraTarget::ALL.to_vec(),
            seed: 0,
        }
    }
}

impl LoraSection {
    /// The model-side adapter configuration.
    pub fn config(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            targets: self.targets.clone(),
        }
    }

    /// Checks rank, alpha and targets; `stage` ("sft", "rl") prefixes the message.
    pub(crate) fn validate(&self, stage: &str) -> Result<()> {
        positive(stage, &[("lora.rank", self.rank)])?;
        finite(stage, &[("lora.alpha", self.alpha, false)])?;
        if self.targets.is_empty() {
            invalid!("{stage} config: `lora.targets` is empty");
        }
        Ok(())
    }
}

/// Errors for the first named count that is 0.
pub(crate) fn positive(stage: &str, fields: &[(&str, usize)]) -> Result<()> {
    if let Some((name, _)) = fields.iter().find(|(_, v)| *v == 0) {
        invalid!("{stage} config: `{name}` must be > 0");
    }
    Ok(())
}

/// Errors for the first named value that is not finite and > 0 (or >= 0 where the third
/// field allows zero).
pub(crate) fn finite(stage: &str, fields: &[(&str, f64, bool)]) -> Result<()> {
    for &(name, v, zero_ok) in fields {
        if !(v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0))) {
            let want = if zero_ok { ">= 0" } else { "> 0" };
            invalid!("{stage} config: `{name}` must be finite and {want}, got {v}");
        }
    }
    Ok(())
}
