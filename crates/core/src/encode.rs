//! Corpus encoding as a resumable job: documents are length-sorted and packed into batches under
//! a token budget; each finished batch is appended to a checkpoint file, so an interrupted run
//! resumes at the first unfinished batch. Batches are a pure function of the corpus and the
//! settings, so a resumed run computes exactly the same batches, and therefore exactly the same
//! vectors, as an uninterrupted one.

use crate::embedder::{EmbedError, Embedder, Side};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Errors from an encoding job.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Embedding failed.
    #[error(transparent)]
    Embed(#[from] EmbedError),
    /// Checkpoint I/O.
    #[error("{path}: {msg}")]
    Checkpoint {
        /// Checkpoint file.
        path: String,
        /// What went wrong.
        msg: String,
    },
    /// The job was cancelled (its checkpoint is kept for resuming).
    #[error("interrupted after {done} of {total} documents; run the same command again to resume")]
    Interrupted {
        /// Documents encoded so far.
        done: usize,
        /// Documents in the corpus.
        total: usize,
    },
}

/// Settings of an encoding job.
#[derive(Debug, Clone)]
pub struct EncodeOptions {
    /// Maximum padded tokens per forward batch (rows × longest prompt).
    pub batch_tokens: usize,
    /// Append-only checkpoint; `None` disables resuming.
    pub checkpoint: Option<PathBuf>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            batch_tokens: 4096,
            checkpoint: None,
            progress: true,
        }
    }
}

/// Result of encoding a corpus.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// One unit vector per input text, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// Texts cut to `max_doc_tokens`.
    pub truncated: usize,
    /// Prompt tokens processed in this run (excluding resumed batches).
    pub tokens: usize,
    /// Wall time of this run.
    pub seconds: f64,
    /// Batches taken from the checkpoint.
    pub resumed_batches: usize,
}

/// Packs prompt lengths, longest first, into batches whose padded size stays under `budget`
/// and where no prompt is shorter than 3/4 of its batch's width: padding is pure waste, and on
/// CPU a pass of a few rows costs about as much per token as a wide one (`bench model --only
/// passes`), so a new batch beats padding a short prompt.
pub fn plan_batches(lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    for i in order {
        // Longest first: the first member of a batch sets its padded width.
        let width = cur.first().map(|&f| lengths[f]).unwrap_or(lengths[i]);
        if !cur.is_empty() && ((cur.len() + 1) * width > budget || lengths[i] * 4 < width * 3) {
            batches.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// Version of [`plan_batches`]' packing rule: checkpoints store vectors per planned batch, so
/// one written under another rule must not be resumed.
const PLAN_VERSION: &[u8] = b"plan-v2: longest first, budget, 3/4 width";

/// Identity of a job: a checkpoint from a different job must not be resumed.
fn job_id(embedder: &Embedder, prompts: &[Vec<u32>], batch_tokens: usize) -> String {
    let mut h = Sha256::new();
    h.update(PLAN_VERSION);
    h.update(embedder.model.id.as_bytes());
    h.update(embedder.template_hash().as_bytes());
    h.update(batch_tokens.to_le_bytes());
    h.update((embedder.dim() as u64).to_le_bytes());
    // The model's trainable state (adapter, embed row) changes every vector.
    for (name, v) in embedder.model.model.trainable_vars() {
        h.update(name.as_bytes());
        if let Ok(vals) = v
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
        {
            for x in vals {
                h.update(x.to_le_bytes());
            }
        }
    }
    for p in prompts {
        h.update((p.len() as u64).to_le_bytes());
        for id in p {
            h.update(id.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

const MAGIC: &[u8; 8] = b"SR3CKPT1";

/// Checkpoint layout: `MAGIC`, 64-byte hex job id, then records of
/// `[batch index u32][rows u32][(doc index u32, dim × f32) × rows]`. A trailing partial record
/// (a crash mid-append) is ignored and overwritten.
struct Checkpoint {
    path: PathBuf,
    file: std::fs::File,
}

fn ck_err(path: &Path, msg: impl std::fmt::Display) -> EncodeError {
    EncodeError::Checkpoint {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

impl Checkpoint {
    /// Opens (resuming when the job id matches) and returns finished batches' vectors.
    #[allow(clippy::type_complexity)]
    fn open(
        path: &Path,
        job: &str,
        dim: usize,
    ) -> Result<(Checkpoint, Vec<(usize, Vec<(usize, Vec<f32>)>)>), EncodeError> {
        let mut done = Vec::new();
        let mut valid_len = 0u64;
        if let Ok(mut f) = std::fs::File::open(path) {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(|e| ck_err(path, e))?;
            if buf.len() >= 72 && &buf[..8] == MAGIC && &buf[8..72] == job.as_bytes() {
                let mut off = 72;
                valid_len = 72;
                let rec = 4 + 4 * dim;
                while off + 8 <= buf.len() {
                    let bi = u32::from_le_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                    let rows =
                        u32::from_le_bytes(buf[off + 4..off + 8].try_into().unwrap()) as usize;
                    let end = off + 8 + rows * rec;
                    if end > buf.len() {
                        break;
                    }
                    let mut items = Vec::with_capacity(rows);
                    for r in 0..rows {
                        let s = off + 8 + r * rec;
                        let di = u32::from_le_bytes(buf[s..s + 4].try_into().unwrap()) as usize;
                        let v = buf[s + 4..s + rec]
                            .chunks_exact(4)
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                            .collect();
                        items.push((di, v));
                    }
                    done.push((bi, items));
                    off = end;
                    valid_len = end as u64;
                }
            } else if !buf.is_empty() {
                tracing::warn!(
                    "{}: checkpoint belongs to a different job; starting over",
                    path.display()
                );
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| ck_err(path, e))?;
        file.set_len(valid_len).map_err(|e| ck_err(path, e))?;
        let mut ck = Checkpoint {
            path: path.to_path_buf(),
            file,
        };
        if valid_len == 0 {
            ck.write(&[MAGIC.as_slice(), job.as_bytes()].concat())?;
        }
        use std::io::Seek;
        ck.file
            .seek(std::io::SeekFrom::End(0))
            .map_err(|e| ck_err(path, e))?;
        Ok((ck, done))
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        self.file
            .write_all(bytes)
            .map_err(|e| ck_err(&self.path, e))
    }

    fn append(&mut self, batch: usize, items: &[(usize, &Vec<f32>)]) -> Result<(), EncodeError> {
        let mut buf = Vec::new();
        buf.extend((batch as u32).to_le_bytes());
        buf.extend((items.len() as u32).to_le_bytes());
        for (di, v) in items {
            buf.extend((*di as u32).to_le_bytes());
            for x in v.iter() {
                buf.extend(x.to_le_bytes());
            }
        }
        self.write(&buf)?;
        self.file.sync_data().map_err(|e| ck_err(&self.path, e))
    }
}

/// Encodes `texts` as documents. `cancel` is checked between batches (Ctrl-C handlers and tests
/// set it); on cancel the checkpoint is kept and [`EncodeError::Interrupted`] returned.
pub fn encode_documents(
    embedder: &Embedder,
    texts: &[String],
    opts: &EncodeOptions,
    cancel: &AtomicBool,
) -> Result<Encoded, EncodeError> {
    let t0 = Instant::now();
    let prompts: Vec<_> = texts
        .iter()
        .map(|t| embedder.document_prompt(t))
        .collect::<Result<Vec<_>, _>>()?;
    let truncated = prompts.iter().filter(|p| p.truncated).count();
    let ids: Vec<Vec<u32>> = prompts.into_iter().map(|p| p.ids).collect();
    let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    let batches = plan_batches(&lengths, opts.batch_tokens);
    let dim = embedder.dim();
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
    let mut finished = vec![false; batches.len()];
    let mut ck = match &opts.checkpoint {
        Some(p) => {
            let job = job_id(embedder, &ids, opts.batch_tokens);
            let (ck, done) = Checkpoint::open(p, &job, dim)?;
            for (bi, items) in done {
                if bi < finished.len() {
                    finished[bi] = true;
                    for (di, v) in items {
                        if di < vectors.len() {
                            vectors[di] = Some(v);
                        }
                    }
                }
            }
            Some(ck)
        }
        None => None,
    };
    let resumed_batches = finished.iter().filter(|&&f| f).count();
    let total_tokens: usize = lengths.iter().sum();
    let done_docs: usize = batches
        .iter()
        .zip(&finished)
        .filter(|(_, f)| **f)
        .map(|(b, _)| b.len())
        .sum();
    let pb = if opts.progress {
        let pb = ProgressBar::new(texts.len() as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} encoding [{bar:30}] {pos}/{len} docs  {per_sec}  {msg}  ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        pb.set_position(done_docs as u64);
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut tokens = 0usize;
    let run_start = Instant::now();
    // indicatif draws nothing when stderr is a file: logs get a plain line every 30 s instead.
    let plain = opts.progress && !std::io::stderr().is_terminal();
    let mut last_line = Instant::now();
    let mut done = done_docs;
    for (bi, batch) in batches.iter().enumerate() {
        if finished[bi] {
            continue;
        }
        if cancel.load(Ordering::SeqCst) {
            pb.abandon();
            let done = vectors.iter().filter(|v| v.is_some()).count();
            return Err(EncodeError::Interrupted {
                done,
                total: texts.len(),
            });
        }
        let prompts: Vec<Vec<u32>> = batch.iter().map(|&i| ids[i].clone()).collect();
        let vecs = embedder.embed_prompts(Side::Document, &prompts)?;
        tokens += batch.iter().map(|&i| lengths[i]).sum::<usize>();
        if let Some(ck) = ck.as_mut() {
            let items: Vec<(usize, &Vec<f32>)> = batch.iter().copied().zip(vecs.iter()).collect();
            ck.append(bi, &items)?;
        }
        for (&i, v) in batch.iter().zip(vecs) {
            vectors[i] = Some(v);
        }
        pb.inc(batch.len() as u64);
        done += batch.len();
        let el = run_start.elapsed().as_secs_f64().max(1e-9);
        if plain && (last_line.elapsed().as_secs() >= 30 || done == texts.len()) {
            last_line = Instant::now();
            // Batches run longest-first, so the docs-based ETA errs on the long side.
            let left = el / (done - done_docs) as f64 * (texts.len() - done) as f64;
            eprintln!(
                "encoding: {done}/{} docs, {:.0} tok/s, ETA {left:.0} s",
                texts.len(),
                tokens as f64 / el
            );
        }
        pb.set_message(format!(
            "{:.0} tok/s ({} of {} tokens)",
            tokens as f64 / el,
            tokens,
            total_tokens
        ));
    }
    pb.finish_and_clear();
    let vectors = vectors
        .into_iter()
        .map(|v| v.expect("every batch ran"))
        .collect();
    Ok(Encoded {
        vectors,
        truncated,
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
        resumed_batches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_budget_and_cover_everything_once() {
        let lengths = [5, 40, 12, 40, 7, 100, 3, 64, 64, 1];
        let b = plan_batches(&lengths, 128);
        let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for batch in &b {
            let w = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(batch.len() == 1 || batch.len() * w <= 128, "{batch:?}");
            // Padding stays under a quarter of any row.
            assert!(batch.iter().all(|&i| lengths[i] * 4 >= w * 3), "{batch:?}");
        }
        // Deterministic.
        assert_eq!(b, plan_batches(&lengths, 128));
        // A document longer than the budget still gets a batch of its own.
        assert_eq!(plan_batches(&[500, 2], 100), vec![vec![0], vec![1]]);
    }
}
