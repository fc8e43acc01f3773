fn main() -> std::process::ExitCode {
    berth_exec_shim::main()
}
