//! The `vipgate` binary; everything lives in the library so fuzz targets can reach it.

fn main() -> std::process::ExitCode {
    vipgate::main_entry()
}
