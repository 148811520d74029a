//! The `magictailor` binary: tune the CPU runtime, then hand over to the command line
//! (`cli/`), which parses, calls the library and maps errors to exit codes.

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    magictailor::device::tune_cpu_runtime();
    cli::run()
}
