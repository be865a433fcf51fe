//! What every part of the VMM reports failures with: the process exit codes, and an error's
//! chain of causes on one line. A leaf module, so that any part may use it.

/// Process exit codes for ends that are not a guest's own code.
pub mod exit_code {
    /// Largest guest code passed through; larger codes are clamped to it.
    pub const GUEST_MAX: u8 = 199;
    /// A vCPU aborted (assertion or panic in the guest).
    pub const GUEST_ABORTED: u8 = 200;
    /// A vCPU failed: triple fault, invalid ucall, KVM internal error.
    pub const GUEST_FAILED: u8 = 201;
    /// `--timeout` expired.
    pub const TIMED_OUT: u8 = 202;
    /// Bad input: a value, a file or a device the VMM cannot use (nothing ran).
    pub const BAD_INPUT: u8 = 203;
    /// The VMM itself failed while running.
    pub const VMM_FAILED: u8 = 204;
}

/// An error and its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out += &format!(": {cause}");
        source = cause.source();
    }
    out
}
