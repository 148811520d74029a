//! `magictailor info`: what a run folder holds.

use std::path::PathBuf;

use clap::Args;
use magictailor::io::console;

#[derive(Args)]
pub(super) struct InfoArgs {
    /// The run folder (a train --output-dir, or a batch pair's folder).
    #[arg(default_value = magictailor::io::run::DEFAULT_DIR)]
    dir: PathBuf,
    /// One JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub(super) fn info_cmd(a: InfoArgs) -> magictailor::Result<()> {
    let info = magictailor::info::read(&a.dir)?;
    if a.json {
        console::line(info.to_json());
    } else {
        console::line(info.text());
    }
    Ok(())
}
