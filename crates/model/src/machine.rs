//! The machine a figure was measured on. Speed here depends on the CPU's vector extensions
//! (candle's gemm picks AVX-512 kernels at run time; the same code is up to 3× slower on an
//! AVX2-only CPU), so every benchmark records the CPU model, the extensions that matter and the
//! threads, and figures from different machines are never compared as if they were one.

use serde::Serialize;

/// Vector extensions that change which kernels run: AVX2/FMA (the baseline), AVX-512 (candle's
/// gemm), AVX-512 BF16/VNNI (bf16 and int8 dot products) and AMX (Intel's matrix tiles).
pub const ISA_FLAGS: &[&str] = &[
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_bf16",
    "avx512_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
];

/// The CPU and threads a benchmark ran on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Machine {
    /// CPU model name (`/proc/cpuinfo`'s `model name`; the architecture where there is none).
    pub cpu: String,
    /// Logical CPUs this process may run on.
    pub cores: usize,
    /// Of [`ISA_FLAGS`], those the CPU has, in that order.
    pub isa: Vec<String>,
    /// Threads candle's matmuls use.
    pub threads: usize,
}

impl Machine {
    /// The machine this process runs on.
    pub fn current() -> Machine {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let flags = field("flags").unwrap_or_default();
        let has: Vec<&str> = flags.split_whitespace().collect();
        let isa = if has.is_empty() {
            detected()
        } else {
            ISA_FLAGS
                .iter()
                .filter(|f| has.contains(f))
                .map(|f| f.to_string())
                .collect()
        };
        Machine {
            cpu: field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            isa,
            threads: candle_core::utils::get_num_threads(),
        }
    }
}

/// The extensions the standard library can detect, where `/proc/cpuinfo` is not available.
fn detected() -> Vec<String> {
    #[cfg(target_arch = "x86_64")]
    {
        let found = [
            ("avx2", std::is_x86_feature_detected!("avx2")),
            ("fma", std::is_x86_feature_detected!("fma")),
            ("avx512f", std::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::is_x86_feature_detected!("avx512bw")),
        ];
        found
            .iter()
            .filter(|(_, on)| *on)
            .map(|(f, _)| f.to_string())
            .collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, {} cores, {}, {} threads",
            self.cpu,
            self.cores,
            if self.isa.is_empty() {
                "no AVX2".to_string()
            } else {
                self.isa.join(" ")
            },
            self.threads
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_names_its_cpu_and_only_known_flags() {
        let m = Machine::current();
        assert!(!m.cpu.is_empty() && m.cores >= 1 && m.threads >= 1);
        assert!(m.isa.iter().all(|f| ISA_FLAGS.contains(&f.as_str())));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            m.isa.iter().any(|f| f == "avx512f"),
            std::is_x86_feature_detected!("avx512f"),
            "{m}"
        );
        assert!(m.to_string().contains(&m.cpu));
    }
}
