//! Checkpoints: `OUT/checkpoint/` holds the trainable state (`adapter.safetensors`), the
//! optimizer moments (`optimizer.safetensors`), whatever else a stage needs (the RL
//! environment), and last the stage's state JSON with the sha256 of the adapter and optimizer
//! files. A new checkpoint is filled in a temporary directory and swapped in (old aside, new
//! in, old removed), so a crash at any point leaves one complete checkpoint; reading one
//! recovers the aside copy when a crash came between the two renames, checks the format and
//! the checksums, and refuses the other stage's checkpoint by name.

use crate::error::{file_err, Result};
use search_r3_model::files::sha256_file;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The checkpoint directory in a run's output directory.
pub(crate) const CKPT: &str = "checkpoint";
const CKPT_OLD: &str = ".checkpoint.old";
/// The trainable state in a checkpoint (and the final adapter in the output directory).
pub(crate) const ADAPTER: &str = "adapter.safetensors";
/// AdamW's moments in a checkpoint.
pub(crate) const OPTIMIZER: &str = "optimizer.safetensors";
/// Stage 1's state file.
pub(crate) const SFT_STATE: &str = "trainer_state.json";
/// Stage 2's state file.
pub(crate) const RL_STATE: &str = "rl_state.json";

/// The thought stage's state file.
pub(crate) const REASON_STATE: &str = "reason_state.json";

/// How a training stage's checkpoint is recognised.
pub(crate) struct CheckpointKind {
    /// Its state file in `checkpoint/`.
    pub(crate) state_file: &'static str,
    /// The `format` its state must carry.
    pub(crate) format: &'static str,
    /// The error when there is no such state to resume from.
    pub(crate) missing: &'static str,
    /// The other stage's state file, and the error naming it (a run directory of the other
    /// stage is not "no checkpoint").
    pub(crate) foreign: (&'static str, &'static str),
}

/// Stage 1's checkpoints.
pub(crate) const SFT_CHECKPOINT: CheckpointKind = CheckpointKind {
    state_file: SFT_STATE,
    format: "search-r3-sft-checkpoint-1",
    missing: "no checkpoint to resume from (run without --resume to start afresh)",
    foreign: (
        RL_STATE,
        "this is a stage-2 (train rl) checkpoint; give train sft another output directory",
    ),
};

/// Stage 2's checkpoints.
pub(crate) const RL_CHECKPOINT: CheckpointKind = CheckpointKind {
    state_file: RL_STATE,
    format: "search-r3-rl-checkpoint-1",
    missing: "no stage-2 checkpoint to resume from (run without --resume to start afresh)",
    foreign: (
        SFT_STATE,
        "this is a stage-1 (train sft) checkpoint; give train rl another output directory",
    ),
};

/// The thought stage's (`train reason`) checkpoints.
pub(crate) const REASON_CHECKPOINT: CheckpointKind = CheckpointKind {
    state_file: REASON_STATE,
    format: "search-r3-reason-checkpoint-1",
    missing: "no train-reason checkpoint to resume from (run without --resume to start afresh)",
    foreign: (
        RL_STATE,
        "this is a stage-2 (train rl) checkpoint; give train reason another output directory",
    ),
};

/// sha256 of a file, with the path in the error.
fn sha256(path: &Path) -> Result<String> {
    sha256_file(path).map_err(|e| file_err(path, e))
}

/// sha256 of the adapter and optimizer files of `dir`, by name (what a state records).
pub(crate) fn checksums(dir: &Path) -> Result<BTreeMap<String, String>> {
    [ADAPTER, OPTIMIZER]
        .iter()
        .map(|f| Ok((f.to_string(), sha256(&dir.join(f))?)))
        .collect()
}

/// Refuses to start afresh over an existing checkpoint.
pub(crate) fn refuse_existing(out: &Path) -> Result<()> {
    if out.join(CKPT).exists() {
        return Err(file_err(
            &out.join(CKPT),
            "a checkpoint already exists here: pass --resume to continue, or choose another output directory",
        ));
    }
    Ok(())
}

/// Fills a fresh temporary directory with `fill` and swaps it in as `out/checkpoint`: the old
/// checkpoint is renamed aside, the new one renamed in, the old one removed, so a crash at any
/// point leaves one complete checkpoint ([`checkpoint_dir`] recovers the aside one).
pub(crate) fn swap_in(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = out.join(format!(".checkpoint.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| file_err(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| file_err(&tmp, e))?;
    fill(&tmp)?;
    let dst = out.join(CKPT);
    let old = out.join(CKPT_OLD);
    if dst.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| file_err(&old, e))?;
        }
        std::fs::rename(&dst, &old).map_err(|e| file_err(&dst, e))?;
    }
    std::fs::rename(&tmp, &dst).map_err(|e| file_err(&dst, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| file_err(&old, e))?;
    }
    Ok(())
}

/// Writes a stage's state JSON into a checkpoint being filled.
pub(crate) fn write_state<T: serde::Serialize>(
    dir: &Path,
    kind: &CheckpointKind,
    state: &T,
) -> Result<()> {
    let path = dir.join(kind.state_file);
    let json = serde_json::to_vec_pretty(state).expect("state serialises");
    std::fs::write(&path, json).map_err(|e| file_err(&path, e))
}

/// `out/checkpoint`, after moving back the previous checkpoint when a crash between the two
/// renames of a swap left only that one.
fn checkpoint_dir(out: &Path) -> Result<PathBuf> {
    let dir = out.join(CKPT);
    let old = out.join(CKPT_OLD);
    if !dir.exists() && old.exists() {
        std::fs::rename(&old, &dir).map_err(|e| file_err(&dir, e))?;
    }
    Ok(dir)
}

/// Checks that every file a checkpoint state lists has the recorded sha256.
fn verify_checksums(
    dir: &Path,
    state_path: &Path,
    recorded: &BTreeMap<String, String>,
) -> Result<()> {
    for f in [ADAPTER, OPTIMIZER] {
        let path = dir.join(f);
        let Some(want) = recorded.get(f) else {
            return Err(file_err(
                state_path,
                format!("no checksum recorded for {f}"),
            ));
        };
        let got = sha256(&path)?;
        if &got != want {
            return Err(file_err(
                &path,
                format!(
                    "corrupted checkpoint file: sha256 {got} does not match the recorded {want}"
                ),
            ));
        }
    }
    Ok(())
}

/// Reads and verifies `out/checkpoint/<state file>`: its format, and the checksums of the
/// adapter and optimizer files it lists (`header` gives a state's format and checksums).
/// Returns the state and the checkpoint directory.
pub(crate) fn read_state<T: serde::de::DeserializeOwned>(
    out: &Path,
    kind: &CheckpointKind,
    header: impl Fn(&T) -> (&str, &BTreeMap<String, String>),
) -> Result<(T, PathBuf)> {
    let dir = checkpoint_dir(out)?;
    let state_path = dir.join(kind.state_file);
    if dir.join(kind.foreign.0).exists() {
        return Err(file_err(&dir, kind.foreign.1));
    }
    if !state_path.exists() {
        return Err(file_err(&state_path, kind.missing));
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| file_err(&state_path, e))?;
    let state: T = serde_json::from_str(&text)
        .map_err(|e| file_err(&state_path, format!("corrupted checkpoint state: {e}")))?;
    let (format, files) = header(&state);
    if format != kind.format {
        return Err(file_err(
            &state_path,
            format!("unknown checkpoint format `{format}`"),
        ));
    }
    verify_checksums(&dir, &state_path, files)?;
    Ok((state, dir))
}

/// Refuses to resume when a hash the checkpoint recorded differs from the run's: each entry
/// is `(recorded, current, what it means)`.
pub(crate) fn check_hashes(state_path: &Path, checks: &[(&str, &str, &str)]) -> Result<()> {
    for (recorded, current, msg) in checks {
        if recorded != current {
            return Err(file_err(state_path, msg));
        }
    }
    Ok(())
}
