//! Optimizer utilities candle does not provide (BRIEF §4: `candle_nn::AdamW` exists, schedulers
//! and clipping do not), and an AdamW of our own because `candle_nn::AdamW` keeps its moment
//! buffers private, which makes an exact resume impossible.

use crate::error::{invalid, Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Linear warmup to `peak_lr`, then cosine decay to `min_lr` at `total_steps`.
///
/// Steps are 0-based optimizer steps (the index of the update about to be applied):
///
/// * `step < warmup_steps`: `peak_lr · (step + 1) / warmup_steps` — the first update already
///   moves (a zero learning rate at step 0 would waste a batch) and step `warmup_steps − 1`
///   reaches the peak;
/// * `warmup_steps ≤ step ≤ total_steps`: `min_lr + ½(peak_lr − min_lr)(1 + cos(π·p))` with
///   `p = (step − warmup_steps) / (total_steps − warmup_steps)`;
/// * `step ≥ total_steps`: `min_lr`, so a run extended past its plan keeps a sane rate.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// Number of linear warmup steps (0 = start at the peak).
    pub warmup_steps: usize,
    /// Step at which the cosine reaches `min_lr`.
    pub total_steps: usize,
    /// Learning rate at the end of warmup.
    pub peak_lr: f64,
    /// Floor of the cosine decay.
    pub min_lr: f64,
}

impl LrSchedule {
    /// A validated schedule: `warmup_steps ≤ total_steps`, `0 ≤ min_lr ≤ peak_lr`, both finite.
    pub fn new(warmup_steps: usize, total_steps: usize, peak_lr: f64, min_lr: f64) -> Result<Self> {
        let s = Self {
            warmup_steps,
            total_steps,
            peak_lr,
            min_lr,
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks the invariants listed on [`LrSchedule::new`] (useful after deserialising).
    pub fn validate(&self) -> Result<()> {
        if self.warmup_steps > self.total_steps {
            invalid!(
                "lr schedule: warmup_steps ({}) exceeds total_steps ({})",
                self.warmup_steps,
                self.total_steps
            );
        }
        if !(self.peak_lr.is_finite() && self.min_lr.is_finite()) {
            invalid!(
                "lr schedule: peak_lr ({}) and min_lr ({}) must be finite",
                self.peak_lr,
                self.min_lr
            );
        }
        if !(0.0 <= self.min_lr && self.min_lr <= self.peak_lr) {
            invalid!(
                "lr schedule: need 0 <= min_lr <= peak_lr, got min_lr {} and peak_lr {}",
                self.min_lr,
                self.peak_lr
            );
        }
        Ok(())
    }

    /// Learning rate for the 0-based optimizer step `step`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if step >= self.total_steps {
            return self.min_lr;
        }
        // Here warmup_steps <= step < total_steps, so the span is at least 1.
        let span = (self.total_steps - self.warmup_steps) as f64;
        let p = (step - self.warmup_steps) as f64 / span;
        self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// Clips the global L2 norm of the gradients of `vars` to `max_norm`, in place.
///
/// Returns the total norm `√(Σ_vars Σ g²)` *before* clipping (what training curves should show).
/// When it exceeds `max_norm` every gradient is multiplied by `max_norm / (norm + 1e-6)` (the
/// epsilon, as in PyTorch, keeps the clipped norm just under the limit). Vars without a gradient
/// are skipped.
///
/// A NaN or infinite norm returns [`Error::NonFinite`] and leaves `grads` untouched: scaling
/// would spread the NaN into every parameter. The caller should skip the optimizer step.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        invalid!("clip_grad_norm: max_norm must be finite and > 0, got {max_norm}");
    }
    // Squares summed in f64 on the device, one host read at the end.
    let mut sum_sq: Option<Tensor> = None;
    for var in vars {
        if let Some(g) = grads.get(var) {
            let s = g.to_dtype(DType::F64)?.sqr()?.sum_all()?;
            sum_sq = Some(match sum_sq {
                None => s,
                Some(acc) => (acc + s)?,
            });
        }
    }
    let Some(sum_sq) = sum_sq else {
        return Ok(0.0);
    };
    let norm = sum_sq.to_scalar::<f64>()?.sqrt();
    if !norm.is_finite() {
        return Err(Error::NonFinite {
            what: "gradient norm",
            value: norm,
        });
    }
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for var in vars {
            if let Some(g) = grads.get(var) {
                let scaled = (g * scale)?;
                grads.insert(var, scaled);
            }
        }
    }
    Ok(norm)
}

/// Sums the gradients of a fixed set of vars over micro-batches and yields their mean, so a
/// large effective batch can be trained in memory-sized pieces.
///
/// The mean is over micro-batches: with each micro-batch loss already a mean over its own
/// items, this equals the full-batch gradient when micro-batches are equally sized. A var
/// missing from some micro-batch's store counts as a zero gradient there.
#[derive(Debug)]
pub struct GradAccumulator {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An empty accumulator over `vars`.
    pub fn new(vars: &[Var]) -> Self {
        Self {
            vars: vars.to_vec(),
            sums: vec![None; vars.len()],
            micro_batches: 0,
        }
    }

    /// Adds one micro-batch's gradients (only those of the accumulator's vars are read).
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            let Some(g) = grads.get(var) else { continue };
            if g.dims() != var.dims() {
                invalid!(
                    "GradAccumulator: gradient shape {:?} does not match its var {:?}",
                    g.dims(),
                    var.dims()
                );
            }
            // Detached so the accumulated sum never keeps a micro-batch's graph alive.
            let g = g.detach();
            *sum = Some(match sum.take() {
                None => g,
                Some(s) => (s + g)?,
            });
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Number of micro-batches added since creation or the last [`GradAccumulator::reset`].
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The mean gradient per var as a fresh [`GradStore`] (vars never seen are absent).
    pub fn mean(&self) -> Result<GradStore> {
        if self.micro_batches == 0 {
            invalid!("GradAccumulator: mean of zero micro-batches");
        }
        let n = self.micro_batches as f64;
        let mut out = GradStore::default();
        for (var, sum) in self.vars.iter().zip(&self.sums) {
            if let Some(s) = sum {
                out.insert(var, (s / n)?);
            }
        }
        Ok(out)
    }

    /// The summed gradient per var (for callers that already weight each micro-batch's loss
    /// by its share of the batch).
    pub fn sum(&self) -> GradStore {
        let mut out = GradStore::default();
        for (var, sum) in self.vars.iter().zip(&self.sums) {
            if let Some(s) = sum {
                out.insert(var, s.clone());
            }
        }
        out
    }

    /// Forgets the accumulated gradients, ready for the next optimizer step.
    pub fn reset(&mut self) {
        self.sums.iter_mut().for_each(|s| *s = None);
        self.micro_batches = 0;
    }
}

/// AdamW hyper-parameters other than the learning rate, which is passed per step (it comes
/// from an [`LrSchedule`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Decay of the first moment (default 0.9).
    pub beta1: f64,
    /// Decay of the second moment (default 0.999).
    pub beta2: f64,
    /// Added to `√v̂` in the denominator (default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay λ, applied as `θ ← θ(1 − lr·λ)` (default 0.01, PyTorch's).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// Checks `0 ≤ β < 1`, `eps > 0`, `weight_decay ≥ 0`.
    pub fn validate(&self) -> Result<()> {
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                invalid!("AdamW: {name} must be in [0, 1), got {b}");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            invalid!("AdamW: eps must be finite and > 0, got {}", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            invalid!(
                "AdamW: weight_decay must be finite and >= 0, got {}",
                self.weight_decay
            );
        }
        Ok(())
    }
}

#[derive(Debug)]
struct AdamWParam {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    /// Updates applied to this parameter (its bias-correction exponent). Per parameter, as in
    /// PyTorch, because a var without a gradient in some step is not updated.
    t: u64,
}

/// Prefix of every key written by [`AdamW::state_tensors`], so optimizer state can share a
/// safetensors file with other tensors.
pub const ADAMW_PREFIX: &str = "adamw.";

/// AdamW (Loshchilov & Hutter, 2019) with inspectable, restorable state.
///
/// For each parameter with a gradient `g`, at its `t`-th update with learning rate `lr`:
///
/// ```text
/// θ ← θ·(1 − lr·λ)
/// m ← β1·m + (1 − β1)·g
/// v ← β2·v + (1 − β2)·g²
/// θ ← θ − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
/// ```
///
/// (PyTorch's arrangement of the bias corrections.) Moments are kept in the parameter's dtype.
/// Parameters without a gradient in a step are left alone, moments and decay included.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<AdamWParam>,
    steps: u64,
}

impl AdamW {
    /// An optimizer over named vars (e.g. `LoraAdapters::named_vars()`); names key the saved
    /// state and must be unique.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let mut seen = HashSet::new();
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if !seen.insert(name.clone()) {
                invalid!("AdamW: parameter name `{name}` appears twice");
            }
            if !var.dtype().is_float() {
                invalid!(
                    "AdamW: parameter `{name}` has non-float dtype {:?}",
                    var.dtype()
                );
            }
            let m = var.zeros_like()?;
            let v = var.zeros_like()?;
            params.push(AdamWParam {
                name,
                var,
                m,
                v,
                t: 0,
            });
        }
        Ok(Self {
            config,
            params,
            steps: 0,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Number of [`AdamW::step`] calls so far (restored by [`AdamW::load_state`]).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The vars being optimised, in construction order.
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    /// Applies one update with learning rate `lr` to every parameter that has a gradient in
    /// `grads`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            invalid!("AdamW: learning rate must be finite and >= 0, got {lr}");
        }
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        // Validate every gradient before touching any parameter, so an error leaves the model
        // and the optimizer exactly as they were.
        for p in &self.params {
            if let Some(g) = grads.get(&p.var) {
                if g.dims() != p.var.dims() || g.dtype() != p.var.dtype() {
                    invalid!(
                        "AdamW: gradient of `{}` is {:?} {:?}, parameter is {:?} {:?}",
                        p.name,
                        g.dtype(),
                        g.dims(),
                        p.var.dtype(),
                        p.var.dims()
                    );
                }
            }
        }
        for p in &mut self.params {
            let Some(g) = grads.get(&p.var) else { continue };
            let g = g.detach();
            let t = p.t + 1;
            let bc1 = 1.0 - beta1.powf(t as f64);
            let bc2_sqrt = (1.0 - beta2.powf(t as f64)).sqrt();
            let m = ((&p.m * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&p.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + eps)?;
            let update = (m.div(&denom)? * (lr / bc1))?;
            let decayed = (p.var.as_tensor() * (1.0 - lr * weight_decay))?;
            p.var.set(&(decayed - update)?)?;
            p.m = m;
            p.v = v;
            p.t = t;
        }
        self.steps += 1;
        Ok(())
    }

    /// The optimizer state as named tensors: `adamw.m.<name>`, `adamw.v.<name>` (parameter
    /// dtype), `adamw.t.<name>` (i64 scalar) and `adamw.steps` (i64 scalar). Parameters
    /// themselves are not included; checkpoint them separately.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let device = self
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut out = Vec::with_capacity(3 * self.params.len() + 1);
        out.push((
            format!("{ADAMW_PREFIX}steps"),
            Tensor::new(to_i64(self.steps)?, &device)?,
        ));
        for p in &self.params {
            out.push((format!("{ADAMW_PREFIX}m.{}", p.name), p.m.clone()));
            out.push((format!("{ADAMW_PREFIX}v.{}", p.name), p.v.clone()));
            out.push((
                format!("{ADAMW_PREFIX}t.{}", p.name),
                Tensor::new(to_i64(p.t)?, &device)?,
            ));
        }
        Ok(out)
    }

    /// Restores state produced by [`AdamW::state_tensors`] for the same parameter names.
    ///
    /// Keys outside the `adamw.` prefix are ignored (the map may be a whole checkpoint). Every
    /// parameter must be present with matching shape and dtype, and no unknown `adamw.` key may
    /// remain: state for a different adapter set is an error, not a partial load. Nothing is
    /// changed when an error is returned.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: String| -> Result<&Tensor> {
            tensors
                .get(&key)
                .ok_or_else(|| Error::Invalid(format!("AdamW state: missing `{key}`")))
        };
        let steps = read_count(get(format!("{ADAMW_PREFIX}steps"))?, "steps")?;
        let mut loaded = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let m = get(format!("{ADAMW_PREFIX}m.{}", p.name))?;
            let v = get(format!("{ADAMW_PREFIX}v.{}", p.name))?;
            for (what, x) in [("m", m), ("v", v)] {
                if x.dims() != p.var.dims() || x.dtype() != p.var.dtype() {
                    invalid!(
                        "AdamW state: `{what}.{}` is {:?} {:?}, parameter is {:?} {:?}",
                        p.name,
                        x.dtype(),
                        x.dims(),
                        p.var.dtype(),
                        p.var.dims()
                    );
                }
            }
            let t = read_count(get(format!("{ADAMW_PREFIX}t.{}", p.name))?, &p.name)?;
            let device = p.var.device();
            loaded.push((m.to_device(device)?, v.to_device(device)?, t));
        }
        let expected = 1 + 3 * self.params.len();
        let present = tensors
            .keys()
            .filter(|k| k.starts_with(ADAMW_PREFIX))
            .count();
        if present != expected {
            let known: HashSet<String> = self
                .state_key_names()
                .into_iter()
                .collect::<HashSet<String>>();
            let mut extra: Vec<&String> = tensors
                .keys()
                .filter(|k| k.starts_with(ADAMW_PREFIX) && !known.contains(*k))
                .collect();
            extra.sort();
            invalid!(
                "AdamW state: {} unknown key(s), e.g. {:?} (state of a different parameter set?)",
                extra.len(),
                extra.first()
            );
        }
        for (p, (m, v, t)) in self.params.iter_mut().zip(loaded) {
            p.m = m;
            p.v = v;
            p.t = t;
        }
        self.steps = steps;
        Ok(())
    }

    fn state_key_names(&self) -> Vec<String> {
        let mut keys = vec![format!("{ADAMW_PREFIX}steps")];
        for p in &self.params {
            for kind in ["m", "v", "t"] {
                keys.push(format!("{ADAMW_PREFIX}{kind}.{}", p.name));
            }
        }
        keys
    }

    /// Writes [`AdamW::state_tensors`] to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> = self.state_tensors()?.into_iter().collect();
        candle_core::safetensors::save(&map, path).map_err(|e| Error::File {
            path: path.to_path_buf(),
            msg: format!("writing AdamW state: {e}"),
        })
    }

    /// Reads a file written by [`AdamW::save`] and applies [`AdamW::load_state`].
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = self
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let map = candle_core::safetensors::load(path, &device).map_err(|e| Error::File {
            path: path.to_path_buf(),
            msg: format!("reading AdamW state: {e}"),
        })?;
        self.load_state(&map).map_err(|e| Error::File {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }
}

fn to_i64(x: u64) -> Result<i64> {
    i64::try_from(x).map_err(|_| Error::Invalid(format!("AdamW: step count {x} overflows i64")))
}

fn read_count(t: &Tensor, what: &str) -> Result<u64> {
    if t.dtype() != DType::I64 || t.rank() != 0 {
        invalid!(
            "AdamW state: step count for `{what}` must be an i64 scalar, got {:?} {:?}",
            t.dtype(),
            t.dims()
        );
    }
    let x = t.to_scalar::<i64>()?;
    u64::try_from(x).map_err(|_| Error::Invalid(format!("AdamW state: negative step count {x}")))
}
