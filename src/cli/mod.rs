//! The command line: one file per subcommand, each holding its clap struct and the
//! conversion to the library's options. Every default is read from the library's options
//! types, so it is written once. May import the library; nothing imports this.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use magictailor::io::console;
use magictailor::profile;

mod batch;
mod compare;
mod doctor;
mod eval;
mod infer;
mod info;
mod masks;
mod train;

#[derive(Parser)]
#[command(
    name = "magictailor",
    version,
    about = "Component-controllable personalization of Stable Diffusion (MagicTailor)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune LoRA adapters and pseudo-words on a pair folder (MagicTailor).
    Train(train::TrainArgs),
    /// Generate images from a prompt with a trained folder or a base model.
    Infer(infer::InferArgs),
    /// Train many pairs with one model load; safe to run as many workers (job arrays).
    ///
    /// Exit status: 0 when every pair of this worker's shard is trained or skipped, 1 when
    /// some failed on their input (recorded in batch_summary.jsonl), 75 when the machine
    /// failed (e.g. out of memory) and a scheduler may retry, 130 / 143 when stopped by
    /// Ctrl-C / SIGTERM (a re-run resumes).
    Batch(batch::BatchArgs),
    /// Make masks/ for a pair folder from the base model's own cross-attention (no
    /// Grounded-SAM), optionally refined with Segment Anything; check them in
    /// masks/preview.png.
    ///
    /// Each image is encoded, noised to a few mid timesteps with fixed noise, and run
    /// through the U-Net on "a photo of a {concept}" (concept images) or "a photo of a
    /// {concept} with {component}" (component images). The class word's attention,
    /// averaged over heads, the 16x16 and 32x32 layers and the timesteps, is thresholded
    /// with Otsu's method and cleaned up; a concept mask leaves out its components.
    Masks(masks::MasksArgs),
    /// Score a trained folder as the paper does: CLIP-T, CLIP-I and DINO over the
    /// evaluation prompts x seeds (drawn here, or reused when already drawn).
    Eval(eval::EvalArgs),
    /// Put evaluated runs side by side as the paper's Table 1: CLIP-T, CLIP-I and DINO per
    /// method, mean ± std over pairs, overall and per aspect group (compare.md), and a page
    /// with every prompt's images per method beside the reference images (compare.html).
    Compare(compare::CompareArgs),
    /// Check this build and machine: the GPU and its libraries, each kernel family
    /// against candle's ops, the hub cache. Run it first; paste `--json` into bug reports.
    ///
    /// Exit status: 0 when everything checked passed, 1 otherwise.
    Doctor(doctor::DoctorArgs),
    /// What a run folder holds, finished or not: method, base model, words, steps,
    /// outputs, checkpoints, and the command line of each segment.
    Info(info::InfoArgs),
    /// Print a shell completion script: `magictailor completions bash > ~/.local/share/bash-completion/completions/magictailor`.
    Completions(CompletionsArgs),
}

#[derive(Args)]
struct CompletionsArgs {
    /// bash, zsh, fish, powershell or elvish.
    shell: clap_complete::Shell,
}

/// Where the diffusion model runs, and in what precision (`masks`, `infer`, `eval`).
#[derive(Args)]
struct Compute {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = magictailor::device::AUTO)]
    device: String,
    /// Precision of the diffusion model's weights: f32, bf16 (CUDA) or f16.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: Precision,
}

impl Compute {
    fn device(&self) -> magictailor::Result<candle_core::Device> {
        magictailor::device::parse(&self.device)
    }
}

/// What a single-file checkpoint (`--model FILE.safetensors`) needs beside its weights.
#[derive(Args)]
struct SingleFileArgs {
    /// For a single-file --model: a diffusers folder whose configs and tokenizer describe
    /// it (a model of non-standard size; its weights are not read) [default: the family's
    /// bundled configs].
    #[arg(long, value_name = "DIR")]
    model_config: Option<std::path::PathBuf>,
    /// For a single-file --model: what its U-Net predicts, which SD 2.x weights do not
    /// tell (2.x-base: epsilon; 2.x at 768 px: v_prediction).
    #[arg(long, value_parser = ["epsilon", "v_prediction"])]
    prediction_type: Option<String>,
}

impl SingleFileArgs {
    fn options(&self) -> magictailor::model::loader::SingleFileOptions {
        magictailor::model::loader::SingleFileOptions {
            model_config: self.model_config.clone(),
            prediction_type: self.prediction_type.clone(),
        }
    }

    /// For commands whose --model is optional (a trained folder's record names the base
    /// and what it needs): the settings describe --model, so they need it, and it must be
    /// a single file.
    fn options_for(
        &self,
        model: Option<&str>,
    ) -> magictailor::Result<magictailor::model::loader::SingleFileOptions> {
        let opts = self.options();
        if model.is_none() && opts != Default::default() {
            return Err(magictailor::Error::usage(
                "--model-config and --prediction-type describe a single-file --model: pass it \
                 too (a trained folder's magictailor.json records what its own base needs).",
            ));
        }
        if let Some(m) = model {
            magictailor::model::loader::check_single_file_options(m, &opts)?;
        }
        Ok(opts)
    }
}

/// `--width`/`--height` as given, the model's own side (`native`, read only when one is
/// missing) for the others.
fn sides(
    width: Option<usize>,
    height: Option<usize>,
    native: impl FnOnce() -> magictailor::Result<usize>,
) -> magictailor::Result<(usize, usize)> {
    if let (Some(w), Some(h)) = (width, height) {
        return Ok((w, h));
    }
    let side = native()?;
    Ok((width.unwrap_or(side), height.unwrap_or(side)))
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Precision {
    F32,
    Bf16,
    F16,
}

impl Precision {
    fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F16 => candle_core::DType::F16,
        }
    }
}

/// With profiling on: prints where the command's time went to stderr, and gives the
/// table as JSON for `--json` output.
fn print_profile(run: Option<profile::Run>) -> Option<serde_json::Value> {
    let report = run?.finish();
    console::note(report.table().trim_end());
    Some(report.to_json())
}

/// The command line. A value may be negative (`--guidance -1`), so that it reaches the
/// checks that name the valid range instead of being taken for an unknown flag.
fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command().mut_subcommands(|sc| {
        sc.mut_args(|a| {
            let takes = a.get_num_args().is_none_or(|n| n.takes_values());
            if takes && a.get_action().takes_values() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
    })
}

/// Parses the command line, runs the subcommand, and gives its exit status; errors are
/// printed with a hint where one helps.
pub fn run() -> ExitCode {
    let matches = command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let sub = matches.subcommand().map_or(&matches, |(_, m)| m);
    let result = match cli.command {
        Command::Train(a) => train::train_cmd(a, sub).map(|()| 0),
        Command::Infer(a) => infer::infer_cmd(a, sub).map(|()| 0),
        Command::Batch(a) => batch::batch_cmd(a, sub),
        Command::Masks(a) => masks::masks_cmd(a).map(|()| 0),
        Command::Eval(a) => eval::eval_cmd(a).map(|()| 0),
        Command::Compare(a) => compare::compare_cmd(a).map(|()| 0),
        Command::Doctor(a) => doctor::doctor_cmd(a),
        Command::Info(a) => info::info_cmd(a).map(|()| 0),
        Command::Completions(a) => {
            let out = &mut std::io::stdout();
            clap_complete::generate(a.shell, &mut command(), "magictailor", out);
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            console::note(format_args!("error: {e}"));
            if let Some(hint) = magictailor::kernels::sticky_error_hint(&e.to_string()) {
                console::note(format_args!("hint: {hint}"));
            }
            ExitCode::from(e.exit_code())
        }
    }
}
