//! MagicTailor training (paper §3) on one pair folder: DM-Deg, the masked diffusion and
//! cross-attention losses, the warm-up phase, and DS-Bal with its momentum U-Net.
//!
//! - settings: `config` (flags, defaults, checks), `settings_file` (`--config`),
//!   `segments` (the settings a resume must not change);
//! - the method: `method` (the [`method::Recipe`] the step reads: what trains, losses,
//!   phases, draws), `objective` (a step's batch, noised latents and loss terms), with
//!   its parts `augment`, `dm_deg`, `noise`, `losses`, `ds_bal`, `clic` (CLiC's
//!   objective), `prior` (prior preservation's class images), and `optim` (AdamW,
//!   clipping);
//! - a run: `trainer` (the [`Trainer`] and the types its parts share), `setup` (settings
//!   to trainer, for `train` and `batch`), `step` (one optimizer step), `resume`
//!   (checkpoints), `export` (the finished folder), `watch` (sample grids, loss plot,
//!   TensorBoard), and `driver` (a run folder from claim to export: [`train`]).
//!
//! May import `model`, `data`, `masks`, `io`, `preview`, `profile`, `rng`, `interrupt`
//! and `error`, and `infer` (only `watch` and `prior`, to draw sample grids and class
//! images); never `batch`, `eval`,
//! `doctor` or the command line. Run-folder names come from `io::run`.

pub mod augment;
pub mod clic;
pub mod config;
pub mod dm_deg;
pub mod driver;
pub mod ds_bal;
pub mod export;
pub mod losses;
pub mod method;
pub mod noise;
pub mod objective;
pub mod optim;
pub mod prior;
pub mod resume;
pub mod segments;
pub mod settings_file;
pub mod setup;
pub mod step;
pub mod trainer;
pub mod vico;
pub mod watch;

pub use config::TrainConfig;
pub use driver::train;
pub use trainer::Trainer;
