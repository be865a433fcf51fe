//! Fault injection for tests: named points in the memory path, the threads and the files
//! where a test can make the VMM fail, stall or panic on purpose (the `fail` crate). They are
//! compiled out unless the `failpoints` feature is on (`make test` turns it on; `make run`
//! and release builds never have it). With it, the `FAILPOINTS` environment variable
//! configures them, for example `FAILPOINTS='uffd-copy=1*return'`.
//!
//! Every point is named where it sits; [`POINTS`] lists them all so that a test cannot name
//! one that does not exist.

/// Every fault injection point, with what making it fire does.
pub const POINTS: &[(&str, &str)] = &[];

/// Whether this build has fault injection compiled in.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Configures the points named in `FAILPOINTS` for the life of the returned guard.
pub fn from_env() -> Option<fail::FailScenario<'static>> {
    ENABLED.then(fail::FailScenario::setup)
}

/// `fires!("name")`: whether point `name` fires now, for points whose effect the caller
/// performs itself (any action that returns makes it fire). Always false without the feature.
#[macro_export]
macro_rules! fires {
    ($name:expr) => {{
        #[allow(clippy::redundant_closure_call)]
        let fired = (|| {
            fail::fail_point!($name, |_| true);
            false
        })();
        fired
    }};
}
