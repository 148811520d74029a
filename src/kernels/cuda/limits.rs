//! What a kernel may be launched with: CUDA's per-block rules on threads, registers and
//! shared memory, and the build's per-kernel resource report (`resources.tsv`).
//!
//! Dependency-free: build.rs includes this file too, to check each kernel's ptxas report
//! with the same rules the launchers and the emulator apply.

/// Shared memory a block may have without opting in (static plus dynamic), on every GPU.
pub const DEFAULT_SHARED: u32 = 48 * 1024;
/// Registers a block may hold (compute capability 5.0 to 12.x).
const BLOCK_REGISTERS: u32 = 64 * 1024;
/// Registers are given to a warp in units of this many.
const REGISTER_UNIT: u32 = 256;

/// The most threads per block a kernel using `registers` per thread can launch with:
/// whole warps, each holding `32 * registers` rounded up to the allocation unit.
pub fn register_limited_threads(registers: u32) -> u32 {
    if registers == 0 {
        return 1024;
    }
    let per_warp = (registers * 32).div_ceil(REGISTER_UNIT) * REGISTER_UNIT;
    (BLOCK_REGISTERS / per_warp * 32).min(1024)
}

/// One kernel compiled for one architecture, as ptxas reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub kernel: String,
    /// Compute capability of the SASS, e.g. 90 for sm_90.
    pub arch: u32,
    /// Its `__launch_bounds__` (0: none).
    pub bound: u32,
    pub registers: u32,
    /// Bytes of `__shared__` arrays.
    pub static_shared: u32,
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// The column names of `resources.tsv`, in order (build.rs writes them).
#[allow(dead_code)]
pub const HEADER: &str =
    "kernel\tarch\tbound\tregisters\tstatic_shared\tstack\tspill_stores\tspill_loads";

impl Resources {
    /// The most threads per block this kernel can launch with.
    pub fn max_threads(&self) -> u32 {
        let bound = if self.bound == 0 { 1024 } else { self.bound };
        bound.min(register_limited_threads(self.registers))
    }

    /// Why this kernel cannot launch as built (empty when it can): the build refuses it.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let name = format!("{} (sm_{})", self.kernel, self.arch);
        if self.bound == 0 {
            p.push(format!(
                "{name} has no __launch_bounds__, so ptxas may give it more registers than its \
                 launches' blocks can hold"
            ));
        } else if register_limited_threads(self.registers) < self.bound {
            p.push(format!(
                "{name} uses {} registers per thread: a block of its bound of {} threads would \
                 need more than a block's {BLOCK_REGISTERS}",
                self.registers, self.bound
            ));
        }
        if self.static_shared > DEFAULT_SHARED {
            p.push(format!(
                "{name} declares {} bytes of static shared memory, over CUDA's {DEFAULT_SHARED}",
                self.static_shared
            ));
        }
        p
    }

    /// One row of `resources.tsv`.
    pub fn line(&self) -> String {
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.kernel,
            self.arch,
            self.bound,
            self.registers,
            self.static_shared,
            self.stack,
            self.spill_stores,
            self.spill_loads
        )
    }

    /// A row of `resources.tsv`; `None` for the header, blank or malformed lines.
    pub fn parse(line: &str) -> Option<Resources> {
        let mut f = line.split('\t');
        let kernel = f.next()?.to_string();
        let mut num = || f.next()?.trim().parse::<u32>().ok();
        let r = Resources {
            kernel,
            arch: num()?,
            bound: num()?,
            registers: num()?,
            static_shared: num()?,
            stack: num()?,
            spill_stores: num()?,
            spill_loads: num()?,
        };
        Some(r)
    }
}

/// All rows of a `resources.tsv` text.
pub fn parse_table(text: &str) -> Vec<Resources> {
    text.lines().filter_map(Resources::parse).collect()
}

/// What one loaded kernel may be launched with on one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_threads: u32,
    /// Dynamic shared memory a launch may ask for.
    pub max_dynamic: u32,
    /// The value to give the kernel's MAX_DYNAMIC_SHARED_SIZE_BYTES attribute, where the
    /// GPU offers more than the default. CUDA refuses any value that, with the kernel's
    /// static shared memory, exceeds what a block may opt into.
    pub opt_in: Option<u32>,
}

impl Limits {
    /// For a kernel of `max_threads` and `static_shared` bytes on a GPU whose blocks may
    /// opt into `optin` bytes of shared memory in all.
    pub fn new(max_threads: u32, static_shared: u32, optin: u32) -> Limits {
        let default = DEFAULT_SHARED.saturating_sub(static_shared);
        let all = optin.saturating_sub(static_shared);
        Limits {
            max_threads,
            max_dynamic: all.max(default),
            opt_in: (all > default).then_some(all),
        }
    }
}
