//! The README's quick start on the bundled model: `blockserve up` (every tier
//! in one process, in-process session store), then `blockserve client generate
//! "def fibonacci(n):"` prints the trained model's greedy continuation.

use std::process::{Command, Stdio};
use std::time::Duration;

use blockserve_testkit::{free_port, wait_for_port, ChildGuard};

#[test]
fn up_then_client_generate_prints_the_bundled_models_continuation() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _up = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_blockserve"))
            .args(["up", "--listen", &listen])
            .env_remove("BLOCKSERVE_MODEL")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port, Duration::from_secs(60));
    let out = Command::new(env!("CARGO_BIN_EXE_blockserve"))
        .args(["client", "generate", "def fibonacci(n):", "--max-new-tokens", "32", "--addr", &format!("http://{listen}")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Greedy on CPU in f32: the tokens are fixed by the bundled weights.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "\n    \"\"\"Test a bogus-in-in-in-in-in-in-in-in-in-in-in-in-\n");
    assert!(stderr.starts_with("[FINISH_REASON_LENGTH | 9 prompt + 32 generated tokens |"), "{stderr}");
}
