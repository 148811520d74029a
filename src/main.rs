//! The `magictailor` command line: parse, call the library, map errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use magictailor::infer::{self, InferOptions};

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
    /// Generate images from a prompt with a trained folder or a base model.
    Infer(InferArgs),
}

#[derive(Args)]
struct InferArgs {
    /// The prompt, e.g. "<v0> with <v1>, in the snow".
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    num_images: u64,
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Classifier-free guidance scale (1 or less turns guidance off).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    /// Output PNG; with several images, files are numbered (result-0.png, ...).
    #[arg(long, default_value = "outputs/inference/result.png")]
    out: PathBuf,
    /// A trained output folder; its magictailor.json names the base model.
    #[arg(long, default_value = "outputs/magictailor")]
    model_dir: PathBuf,
    /// Sample a base model instead (hub repo id, local diffusers folder, or `tiny-random`).
    #[arg(long)]
    model: Option<String>,
    /// LoRA file (peft, older diffusers or kohya layout).
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Pseudo-word embeddings ({token: vector} safetensors).
    #[arg(long)]
    embeds: Option<PathBuf>,
    /// Start from these latents (safetensors tensor `latents`, [n, C, h/f, w/f]) to
    /// reproduce a run made elsewhere exactly.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
}

fn infer_cmd(a: InferArgs) -> magictailor::Result<()> {
    let opts = InferOptions {
        prompt: a.prompt,
        negative_prompt: a.negative_prompt,
        num_images: a.num_images as usize,
        steps: a.steps as usize,
        guidance: a.guidance,
        seed: a.seed,
        width: a.width,
        height: a.height,
        out: a.out,
        model_dir: a.model_dir,
        model: a.model,
        lora: a.lora,
        embeds: a.embeds,
        init_latents: a.init_latents,
        device: magictailor::device::parse(&a.device)?,
        progress: !a.quiet,
    };
    let written = infer::run(&opts)?;
    if !a.quiet {
        for p in written {
            println!("{}", p.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Infer(a) => infer_cmd(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                magictailor::Error::Usage(_) => 2,
                _ => 1,
            })
        }
    }
}
