//! A SoftHSM2 token for the pkcs11 tests: a token directory of the test
//! process's own with one fresh token, made by `softhsm2-util` before the
//! module is first loaded (Debian's softhsm2, which scripts/test
//! installs). Tests give their key objects labels of their own. Without
//! SoftHSM2 the tests skip, and panic instead when CI=true.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use keyward::crypto::kms::{Pkcs11Pin, Pkcs11Settings};

/// The test token's label and user PIN.
pub const TOKEN: &str = "keyward-test";
pub const PIN: &str = "2468101214";
/// A second token (same PIN), whose PIN one test at a time changes.
pub const OUTAGE_TOKEN: &str = "keyward-outage";

pub struct SoftHsm {
    pub module: PathBuf,
    /// The SOFTHSM2_CONF of this process (for `keyward` child processes).
    pub conf: PathBuf,
    /// A file holding [`PIN`].
    pub pin_file: PathBuf,
}

impl SoftHsm {
    pub fn settings(&self) -> Pkcs11Settings {
        self.settings_of(TOKEN)
    }

    pub fn settings_of(&self, token: &str) -> Pkcs11Settings {
        Pkcs11Settings {
            module: self.module.clone(),
            token: token.into(),
            pin: Pkcs11Pin::new(PIN.into()),
            sessions: 4,
        }
    }

    /// The reference of a key object on the test token.
    pub fn uri(&self, object: &str) -> String {
        format!("pkcs11:token={TOKEN};object={object}")
    }

    /// Makes [`OUTAGE_TOKEN`] refuse this process's PIN (`away`), or
    /// accept it again: its user PIN is changed, and this process logged
    /// out, so keyward's next login fails, as after an operator changed
    /// the PIN or the token locked it. Through the module this process has
    /// loaded (a second context of it is never dropped: that would
    /// finalize the module under keyward).
    pub fn outage(&self, away: bool) {
        use cryptoki::{context::Pkcs11, types::AuthPin};
        let context = Pkcs11::new(&self.module).unwrap();
        let slot = context
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|slot| {
                context
                    .get_token_info(*slot)
                    .is_ok_and(|info| info.label().trim_end() == OUTAGE_TOKEN)
            })
            .unwrap();
        let session = context.open_rw_session(slot).unwrap();
        let (pin, other) = (AuthPin::new(PIN.into()), AuthPin::new(OTHER_PIN.into()));
        if away {
            session.set_pin(&pin, &other).unwrap();
            // keyward is logged in (the login holds for the process).
            session.logout().unwrap();
        } else {
            session.set_pin(&other, &pin).unwrap();
        }
        drop(session);
        std::mem::forget(context);
    }
}

/// The PIN [`SoftHsm::outage`] gives the outage token meanwhile.
const OTHER_PIN: &str = "9999999999";

fn module() -> Option<PathBuf> {
    std::env::var_os("KEYWARD_TEST_PKCS11_MODULE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/usr/lib/softhsm/libsofthsm2.so",
                "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
            ]
            .map(PathBuf::from),
        )
        .find(|p| p.is_file())
}

fn init() -> Result<SoftHsm, String> {
    let module = module().ok_or("no libsofthsm2.so (apt install softhsm2)")?;
    let dir = tempfile::Builder::new()
        .prefix("keyward-softhsm-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let tokens = dir.join("tokens");
    std::fs::create_dir(&tokens).map_err(|e| e.to_string())?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    for label in [TOKEN, OUTAGE_TOKEN] {
        let made = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label, "--pin", PIN])
            .args(["--so-pin", "1357911"])
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .map_err(|e| format!("softhsm2-util: {e}"))?;
        if !made.status.success() {
            return Err(String::from_utf8_lossy(&made.stderr).into_owned());
        }
    }
    let pin_file = dir.join("pin");
    std::fs::write(&pin_file, PIN).map_err(|e| e.to_string())?;
    restrict(&pin_file);
    // SoftHSM2 reads its configuration when the module is initialized,
    // which this process does once, after this.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    Ok(SoftHsm {
        module,
        conf,
        pin_file,
    })
}

fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

/// The test token, `None` (with a note) without SoftHSM2; a panic instead
/// when `CI=true`, so CI never passes by skipping.
pub fn hsm_or_skip() -> Option<&'static SoftHsm> {
    static HSM: OnceLock<Result<SoftHsm, String>> = OnceLock::new();
    match HSM.get_or_init(init) {
        Ok(hsm) => Some(hsm),
        Err(reason) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("SoftHSM2 is required in CI but unavailable: {reason}");
            }
            eprintln!("SKIPPED (SoftHSM2 unavailable: {reason})");
            None
        }
    }
}
