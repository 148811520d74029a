//! The Stable Diffusion 2.x stack, with weight names exactly as diffusers saves them.

pub mod attention;
pub mod clip;
pub mod config;
pub mod full;
pub mod hub_env;
pub mod loader;
pub mod lora;
pub mod nn;
pub mod ops;
pub mod probe;
pub mod resnet;
pub mod scheduler;
pub mod single_file;
pub mod swap;
pub mod tiny;
pub mod tokenizer;
pub mod tuned;
pub mod unet;
pub mod vae;
pub mod vico;
