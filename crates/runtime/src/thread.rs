//! Threads on the critical path between two passes (each engine's model
//! thread, the token decoder's link thread) ask the kernel for a higher
//! priority than the runtime's workers. A burst of session work after each
//! batch (recording, relaying, Redis) can otherwise keep every core busy while
//! the thread that launches the next pass waits for one.

/// Nice value critical threads ask for (lower is more urgent).
const CRITICAL_NICE: i32 = -10;

/// Raise the calling thread's priority, best effort: without CAP_SYS_NICE (or
/// a permissive RLIMIT_NICE) the kernel refuses and the thread keeps its
/// priority, which is logged once per thread at debug level.
pub fn make_critical(name: &str) {
    #[cfg(target_os = "linux")]
    {
        // On Linux, PRIO_PROCESS with who = 0 sets the calling thread's nice value.
        // SAFETY: plain syscall with no pointers.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, CRITICAL_NICE) };
        if r != 0 {
            tracing::debug!(thread = name, error = %std::io::Error::last_os_error(), "could not raise thread priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = name;
}
