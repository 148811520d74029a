//! `magictailor batch`: many pairs with one model load, sharded across workers.

use std::path::PathBuf;

use clap::Args;
use magictailor::batch::{BatchOptions, Shard};

use super::train::TrainSettings;

#[derive(Args)]
pub(super) struct BatchArgs {
    /// A folder of pair folders, or a text file with one pair folder per line.
    #[arg(long)]
    pairs: PathBuf,
    /// Each pair trains into OUT_DIR/{pair folder name}/.
    #[arg(long = "out-dir", alias = "output-root")]
    output_root: PathBuf,
    /// Train every SHARD_COUNT-th pair from this index (default: from SLURM_ARRAY_TASK_ID
    /// or JOB_COMPLETION_INDEX, else all pairs).
    #[arg(long)]
    shard_index: Option<usize>,
    /// The number of shards (default: SLURM_ARRAY_TASK_COUNT, or 1).
    #[arg(long)]
    shard_count: Option<usize>,
    /// List what this worker would train, resume or skip; train nothing.
    #[arg(long)]
    dry_run: bool,
    /// Minutes without a heartbeat after which another worker's pair lock is stale.
    #[arg(long, default_value_t = magictailor::io::lock::STALE_AFTER.as_secs() / 60)]
    lock_timeout: u64,
    /// Train every pair with each of these methods (comma-separated), into
    /// OUT_DIR/{method}/{pair}/: the paper's comparison grid, one model load per worker.
    /// Every flag given must apply to each of them. Instead of --method.
    #[arg(long, value_enum, value_delimiter = ',', conflicts_with = "method")]
    methods: Vec<magictailor::train::method::Method>,
    /// Also run the paper's evaluation per pair (not built into batch: refused; run
    /// `magictailor eval --model-dir OUTPUT_ROOT/PAIR` per trained folder).
    #[arg(long)]
    eval: bool,
    #[command(flatten)]
    settings: TrainSettings,
}

pub(super) fn batch_cmd(a: BatchArgs, m: &clap::ArgMatches) -> magictailor::Result<u8> {
    if a.eval {
        return Err(magictailor::Error::usage(
            "--eval: batch does not evaluate; train with `batch`, then run `magictailor eval \
             --model-dir OUTPUT_ROOT/PAIR` on each trained folder (one job per folder on a cluster).",
        ));
    }
    let s = &a.settings;
    let (template, device, stop) = s.resolve(PathBuf::new(), PathBuf::new(), &a.methods, m)?;
    let env = |k: &str| std::env::var(k).ok();
    let opts = BatchOptions {
        pairs: a.pairs,
        output_root: a.output_root,
        shard: Shard::resolve(a.shard_index, a.shard_count, env)?,
        methods: a.methods,
        dry_run: a.dry_run,
        stale_after: std::time::Duration::from_secs(a.lock_timeout.saturating_mul(60)),
    };
    let outcome = magictailor::batch::train_pairs(&template, &opts, &device, s.progress(), &stop)?;
    Ok(outcome.exit_code())
}
