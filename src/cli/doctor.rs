//! `magictailor doctor`: checks this build and machine.

use clap::Args;
use magictailor::io::console;

#[derive(Args)]
pub(super) struct DoctorArgs {
    /// The device to check: auto (a GPU if there is one), cpu, cuda or cuda:N.
    #[arg(long, default_value = magictailor::device::AUTO)]
    device: String,
    /// Also time training steps at 512 px on a random model of SD 2.1-base's shapes
    /// (written once into the temp folder: 5.2 GB), for their speed and peak memory.
    #[arg(long)]
    estimate: bool,
    /// One JSON object on stdout instead of the text report.
    #[arg(long)]
    json: bool,
}

pub(super) fn doctor_cmd(a: DoctorArgs) -> magictailor::Result<u8> {
    let report = magictailor::doctor::diagnose(&magictailor::doctor::DoctorOptions {
        device: a.device,
        estimate: a.estimate,
    })?;
    if a.json {
        console::line(report.to_json());
    } else {
        console::line(report.text().trim_end());
    }
    Ok(u8::from(!report.problems().is_empty()))
}
