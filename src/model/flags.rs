//! samkv's process-wide runtime switches, read from the environment in one place
//! ([`RuntimeFlags::from_env`], at the CLI edge or by `LoadOptions::default`) and carried to
//! the model at load instead of being looked up wherever they matter.

/// Switches for comparisons, diagnosis and escape hatches; all default to the fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuntimeFlags {
    /// samkv's own CUDA kernels (`SAMKV_CUDA_KERNELS=0` turns them off: candle's ops run).
    pub cuda_kernels: bool,
    /// The wgmma attention on Hopper GPUs (`SAMKV_WGMMA=0` keeps the mma.sync form).
    pub wgmma: bool,
    /// `SAMKV_SYNC_PHASES=1`: methods wait for the device at each phase and log the laps,
    /// which costs the overlap between phases (see `methods::clock`).
    pub sync_phases: bool,
}

impl Default for RuntimeFlags {
    fn default() -> Self {
        Self {
            cuda_kernels: true,
            wgmma: true,
            sync_phases: false,
        }
    }
}

impl RuntimeFlags {
    /// The switches as the environment sets them: the only place samkv reads them.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok();
        Self {
            cuda_kernels: var("SAMKV_CUDA_KERNELS").is_none_or(|v| v != "0"),
            wgmma: var("SAMKV_WGMMA").is_none_or(|v| v != "0"),
            sync_phases: var("SAMKV_SYNC_PHASES").is_some_and(|v| v == "1"),
        }
    }
}
