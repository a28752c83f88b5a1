//! LoRA (Hu et al., 2021) on the differentiable path: `y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ`, with the
//! base `W` frozen. `A` starts as PEFT does (Kaiming-uniform, bound `1/√in`) and `B` at zero,
//! so a fresh adapter leaves the model unchanged; note that this also makes `∂L/∂A = 0` until
//! `B` moves away from zero.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

/// A projection inside a block that may carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    /// Query projection.
    Q,
    /// Key projection.
    K,
    /// Value projection.
    V,
    /// Attention output projection.
    O,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
}

impl LoraTarget {
    /// All projections, in block order.
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// Name as used in PEFT configs (`q_proj`, …) and in our safetensors keys.
    pub fn name(&self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// Parses `q`, `q_proj`, … (case-insensitive).
    pub fn parse(s: &str) -> Result<LoraTarget> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_suffix("_proj").unwrap_or(&s);
        Ok(match s {
            "q" => LoraTarget::Q,
            "k" => LoraTarget::K,
            "v" => LoraTarget::V,
            "o" => LoraTarget::O,
            "gate" => LoraTarget::Gate,
            "up" => LoraTarget::Up,
            "down" => LoraTarget::Down,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown LoRA target `{other}` (expected one of q,k,v,o,gate,up,down)"
                )))
            }
        })
    }

    fn index(&self) -> usize {
        *self as usize
    }
}

/// Adapter hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// Scale numerator `α` (the update is scaled by `α/r`).
    pub alpha: f64,
    /// Projections that get an adapter, in every block.
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 16,
            alpha: 32.0,
            targets: LoraTarget::ALL.to_vec(),
        }
    }
}

impl LoraConfig {
    /// `α / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The two low-rank factors of one adapted projection.
#[derive(Debug, Clone)]
pub(crate) struct LoraPair {
    /// Down-projection `A`, `[r, in]`.
    pub a: Var,
    /// Up-projection `B`, `[out, r]`.
    pub b: Var,
}

impl LoraPair {
    /// `(α/r)·(x·Aᵀ)·Bᵀ` for `x` of shape `[n, in]`.
    pub fn delta(&self, x: &Tensor, scale: f64) -> Result<Tensor> {
        let h = x.matmul(&self.a.as_tensor().t()?)?;
        Ok((h.matmul(&self.b.as_tensor().t()?)? * scale)?)
    }
}

/// Adapters for every block: `layers[i][target]`.
#[derive(Debug, Clone)]
pub struct Lora {
    /// Hyper-parameters.
    pub config: LoraConfig,
    layers: Vec<[Option<LoraPair>; 7]>,
}

impl Lora {
    /// Fresh adapters for a model with the given per-target `(in, out)` sizes.
    pub fn new(
        config: LoraConfig,
        num_layers: usize,
        dims: impl Fn(LoraTarget) -> (usize, usize),
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if config.rank == 0 {
            return Err(Error::Invalid("LoRA rank must be at least 1".into()));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for t in &config.targets {
                let (fan_in, fan_out) = dims(*t);
                let bound = 1.0 / (fan_in as f64).sqrt();
                let a: Vec<f32> = (0..config.rank * fan_in)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (config.rank, fan_in), device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((fan_out, config.rank), dtype, device)?;
                slots[t.index()] = Some(LoraPair {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                });
            }
            layers.push(slots);
        }
        Ok(Lora { config, layers })
    }

    /// The adapter on `target` in block `layer`, if any.
    pub(crate) fn get(&self, layer: usize, target: LoraTarget) -> Option<&LoraPair> {
        self.layers.get(layer)?[target.index()].as_ref()
    }

    /// Every factor with a stable name (`layers.{i}.{target}.lora_a|lora_b`).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, slots) in self.layers.iter().enumerate() {
            for t in LoraTarget::ALL {
                if let Some(p) = &slots[t.index()] {
                    out.push((format!("lora.layers.{i}.{}.lora_a", t.name()), p.a.clone()));
                    out.push((format!("lora.layers.{i}.{}.lora_b", t.name()), p.b.clone()));
                }
            }
        }
        out
    }

    /// One adapter that computes `self + other` exactly: ranks add up, `A = [A₁; A₂]`,
    /// `B = [s₁·B₁, s₂·B₂]` with the scale folded into `B` (the result has `α = r`, scale 1).
    /// Stage 2 trains a fresh adapter on top of the folded stage-1 one; stacking them gives a
    /// single adapter for the base model. A projection adapted on one side only gets zero
    /// factors on the other.
    pub fn stack(&self, other: &Lora) -> Result<Lora> {
        if self.layers.len() != other.layers.len() {
            return Err(Error::Invalid(format!(
                "cannot stack adapters for {} and {} layers",
                self.layers.len(),
                other.layers.len()
            )));
        }
        let (r1, r2) = (self.config.rank, other.config.rank);
        let (s1, s2) = (self.config.scale(), other.config.scale());
        let rank = r1 + r2;
        let mut targets: Vec<LoraTarget> = LoraTarget::ALL
            .into_iter()
            .filter(|t| self.config.targets.contains(t) || other.config.targets.contains(t))
            .collect();
        targets.dedup();
        let mut layers = Vec::with_capacity(self.layers.len());
        for (mine, theirs) in self.layers.iter().zip(&other.layers) {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for t in &targets {
                let i = t.index();
                let (a, b) = match (&mine[i], &theirs[i]) {
                    (None, None) => continue,
                    (Some(p), Some(q)) => (
                        Tensor::cat(&[p.a.as_tensor(), q.a.as_tensor()], 0)?,
                        Tensor::cat(&[(p.b.as_tensor() * s1)?, (q.b.as_tensor() * s2)?], 1)?,
                    ),
                    (Some(p), None) => {
                        let (out, inp) = (p.b.dim(0)?, p.a.dim(1)?);
                        let z_a = Tensor::zeros((r2, inp), p.a.dtype(), p.a.device())?;
                        let z_b = Tensor::zeros((out, r2), p.b.dtype(), p.b.device())?;
                        (
                            Tensor::cat(&[p.a.as_tensor(), &z_a], 0)?,
                            Tensor::cat(&[&(p.b.as_tensor() * s1)?, &z_b], 1)?,
                        )
                    }
                    (None, Some(q)) => {
                        let (out, inp) = (q.b.dim(0)?, q.a.dim(1)?);
                        let z_a = Tensor::zeros((r1, inp), q.a.dtype(), q.a.device())?;
                        let z_b = Tensor::zeros((out, r1), q.b.dtype(), q.b.device())?;
                        (
                            Tensor::cat(&[&z_a, q.a.as_tensor()], 0)?,
                            Tensor::cat(&[&z_b, &(q.b.as_tensor() * s2)?], 1)?,
                        )
                    }
                };
                slots[i] = Some(LoraPair {
                    a: Var::from_tensor(&a.detach())?,
                    b: Var::from_tensor(&b.detach())?,
                });
            }
            layers.push(slots);
        }
        Ok(Lora {
            config: LoraConfig {
                rank,
                alpha: rank as f64,
                targets,
            },
            layers,
        })
    }

    /// Adds `(α/r)·(x·Aᵀ)·Bᵀ` to `y` when `target` is adapted in `layer`.
    pub fn apply(&self, layer: usize, target: LoraTarget, x: &Tensor, y: Tensor) -> Result<Tensor> {
        match self.get(layer, target) {
            Some(p) => Ok((y + p.delta(x, self.config.scale())?)?),
            None => Ok(y),
        }
    }
}
