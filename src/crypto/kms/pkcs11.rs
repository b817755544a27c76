//! The `pkcs11` provider: key-encryption keys in an HSM (SoftHSM2 in the
//! tests), reached through its PKCS#11 module with `cryptoki`.
//!
//! keyward generates each data key itself (as with the local KMS) and the
//! HSM wraps it: `C_Encrypt` with `CKM_AES_GCM` over the key's 32 bytes,
//! under an AES-256 key object that is `CKA_SENSITIVE` and not extractable,
//! with a fresh 12-byte nonce (stored in `data_key_iv`) and an AAD that
//! binds the KEK reference, the key record and the encryption context, as
//! the local provider's wrap does. Unwrapping is `C_Decrypt` inside the
//! HSM; the KEK never leaves it. A key record's `kms_key_arn` is an RFC 7512
//! URI naming the object by label ([`super::pkcs11_uri`]).
//!
//! One module, token and user PIN per process ([`Pkcs11Settings`]). The
//! module is loaded and the token found on first use, so a process that
//! never touches a pkcs11 key never loads it. An HSM serializes the work of
//! one session, so a pool of sessions (logged in once: a PKCS#11 login
//! holds for every session of the process) bounds the calls in flight;
//! each call runs on a blocking thread. Object handles are cached by label
//! and dropped when the module says a handle is no longer valid.
//!
//! Failures name the key and say what to do: a refused or locked PIN is
//! FAILED_PRECONDITION (a configuration to fix), a token that is gone or a
//! module that fails is UNAVAILABLE, a missing object is "not found".

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use cryptoki::{
    context::{CInitializeArgs, Pkcs11},
    error::{Error as CkError, RvError},
    mechanism::{aead::GcmParams, Mechanism},
    object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle},
    session::{Session, SessionState, UserType},
    slot::Slot,
    types::AuthPin,
};
use rand::RngCore;
use tokio::sync::{OnceCell, Semaphore};

use super::{
    pkcs11_uri::KeyUri, GeneratedKey, KekRef, KmsError, KmsProvider, Pkcs11Settings, ProviderKind,
    WrappedKey,
};
use crate::crypto::{
    context::{put_bytes, EncryptionContext},
    secret::{SecretKey, KEY_LEN},
};

/// Domain label of the wrap's AAD.
const WRAP_AAD_LABEL: &[u8] = b"keyward.pkcs11-wrap.v1";
const NONCE_LEN: usize = 12;
const TAG_BITS: u64 = 128;

/// What `keyward keys create --generate` found or made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyObject {
    /// A new AES-256 key object, generated inside the token.
    Generated,
    /// An AES key object with that label was there already.
    Adopted,
}

/// A key object's protection, as the token reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyObjectInfo {
    pub sensitive: bool,
    pub always_sensitive: bool,
    pub extractable: bool,
    pub never_extractable: bool,
    /// The key's length in bytes.
    pub value_len: u64,
    /// Whether the token handed out the key's value (it must not).
    pub value_readable: bool,
}

/// The `pkcs11` provider.
pub struct Pkcs11Kms {
    settings: Option<Pkcs11Settings>,
    token: OnceCell<Arc<Token>>,
}

impl Pkcs11Kms {
    /// A provider that opens the token on first use; without settings,
    /// every call says how to configure it.
    pub fn new(settings: Option<Pkcs11Settings>) -> Self {
        Self {
            settings,
            token: OnceCell::new(),
        }
    }

    /// The token, opened (module loaded, slot found) on first use; a failure
    /// is tried again on the next call.
    async fn token(&self, key: &str) -> Result<Arc<Token>, KmsError> {
        let settings = self
            .settings
            .clone()
            .ok_or_else(|| KmsError::NotConfigured {
                provider: ProviderKind::Pkcs11,
                reason: format!(
                    "key {key} is in an HSM: give --pkcs11-module, --pkcs11-token and the PIN \
                 (--pkcs11-pin-file or KEYWARD_PKCS11_PIN)"
                ),
            })?;
        self.token
            .get_or_try_init(|| async move {
                let module = settings.module.display().to_string();
                tokio::task::spawn_blocking(move || Token::open(settings))
                    .await
                    .map_err(|err| KmsError::Unavailable {
                        reason: format!("opening PKCS#11 module {module}: {err}"),
                    })?
                    .map(Arc::new)
            })
            .await
            .cloned()
    }

    /// Creates the AES-256 key object `kms_key_arn` names in the token
    /// (sensitive, not extractable, encrypt and decrypt only), or adopts an
    /// AES key object that has its label already.
    pub async fn create_key_object(&self, kms_key_arn: &str) -> Result<KeyObject, KmsError> {
        let uri = self.uri(kms_key_arn)?;
        let token = self.token(kms_key_arn).await?;
        let key = kms_key_arn.to_owned();
        token
            .run(kms_key_arn, move |token, session| {
                if token.find(session, &uri.object)?.is_some() {
                    return Ok(KeyObject::Adopted);
                }
                session.generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen((KEY_LEN as u64).into()),
                        Attribute::Label(uri.object.clone().into_bytes()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Wrap(false),
                        Attribute::Unwrap(false),
                    ],
                )?;
                tracing::info!(key = %key, "PKCS#11 key object generated in the token");
                Ok(KeyObject::Generated)
            })
            .await
    }

    /// How the token protects the key object `kms_key_arn` names: read
    /// back from the token, with an attempt to read the key's value.
    pub async fn describe_key_object(&self, kms_key_arn: &str) -> Result<KeyObjectInfo, KmsError> {
        self.on_key(kms_key_arn, move |session, handle| {
            let mut info = KeyObjectInfo {
                sensitive: false,
                always_sensitive: false,
                extractable: true,
                never_extractable: false,
                value_len: 0,
                value_readable: false,
            };
            for attribute in session.get_attributes(
                handle,
                &[
                    AttributeType::Sensitive,
                    AttributeType::AlwaysSensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::ValueLen,
                ],
            )? {
                match attribute {
                    Attribute::Sensitive(v) => info.sensitive = v,
                    Attribute::AlwaysSensitive(v) => info.always_sensitive = v,
                    Attribute::Extractable(v) => info.extractable = v,
                    Attribute::NeverExtractable(v) => info.never_extractable = v,
                    Attribute::ValueLen(len) => info.value_len = len.into(),
                    _ => {}
                }
            }
            // A sensitive key's value is unavailable: the module leaves
            // it out (or refuses the whole call).
            info.value_readable = session
                .get_attributes(handle, &[AttributeType::Value])
                .is_ok_and(|values| !values.is_empty());
            Ok(info)
        })
        .await
    }

    /// Runs `op` on the key object `kms_key_arn` names, in a session of the
    /// pool ([`Token::run`]).
    async fn on_key<T: Send + 'static>(
        &self,
        kms_key_arn: &str,
        mut op: impl FnMut(&Session, ObjectHandle) -> Result<T, CkError> + Send + 'static,
    ) -> Result<T, KmsError> {
        let uri = self.uri(kms_key_arn)?;
        let token = self.token(kms_key_arn).await?;
        token
            .run(kms_key_arn, move |token, session| {
                let handle = token.handle(session, &uri.object)?;
                op(session, handle)
            })
            .await
    }

    /// The key reference, which must name this process's token if it names
    /// one.
    fn uri(&self, kms_key_arn: &str) -> Result<KeyUri, KmsError> {
        let uri = KeyUri::parse(kms_key_arn).map_err(|err| KmsError::InvalidKeyRef {
            key: kms_key_arn.to_owned(),
            reason: err.reason(),
        })?;
        if let (Some(named), Some(settings)) = (&uri.token, &self.settings) {
            if *named != settings.token {
                return Err(KmsError::NotConfigured {
                    provider: ProviderKind::Pkcs11,
                    reason: format!(
                        "key {kms_key_arn} is on token {named:?}, this process uses token {:?} (--pkcs11-token)",
                        settings.token
                    ),
                });
            }
        }
        Ok(uri)
    }

    async fn wrap(
        &self,
        kek: KekRef<'_>,
        data_key: &SecretKey,
        context: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        let aad = wrap_aad(kek, context);
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        // The blocking thread gets its own copy, zeroized when it is done.
        let plaintext = data_key.clone();
        let ciphertext = self
            .on_key(kek.kms_key_arn, move |session, handle| {
                let mut iv = nonce;
                let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())?;
                session.encrypt(&Mechanism::AesGcm(params), handle, plaintext.expose())
            })
            .await?;
        Ok(WrappedKey {
            ciphertext,
            iv: nonce.to_vec(),
        })
    }
}

#[async_trait]
impl KmsProvider for Pkcs11Kms {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Pkcs11
    }

    async fn generate_data_key(
        &self,
        kek: KekRef<'_>,
        context: &EncryptionContext,
    ) -> Result<GeneratedKey, KmsError> {
        let plaintext = SecretKey::generate();
        let wrapped = self.wrap(kek, &plaintext, context).await?;
        Ok(GeneratedKey { plaintext, wrapped })
    }

    async fn wrap_data_key(
        &self,
        kek: KekRef<'_>,
        data_key: &SecretKey,
        context: &EncryptionContext,
    ) -> Result<WrappedKey, KmsError> {
        self.wrap(kek, data_key, context).await
    }

    async fn decrypt_data_key(
        &self,
        kek: KekRef<'_>,
        wrapped_key: &[u8],
        wrapped_iv: &[u8],
        context: &EncryptionContext,
    ) -> Result<SecretKey, KmsError> {
        let mut nonce: [u8; NONCE_LEN] =
            wrapped_iv.try_into().map_err(|_| KmsError::UnwrapFailed)?;
        let aad = wrap_aad(kek, context);
        let sealed = wrapped_key.to_vec();
        let opened = self
            .on_key(kek.kms_key_arn, move |session, handle| {
                let params = GcmParams::new(&mut nonce, &aad, TAG_BITS.into())?;
                match session.decrypt(&Mechanism::AesGcm(params), handle, &sealed) {
                    Ok(mut plain) => {
                        let key = SecretKey::from_slice(&plain);
                        zeroize::Zeroize::zeroize(&mut plain);
                        Ok(key)
                    }
                    // Modules report a tag that does not verify in their
                    // own ways (SoftHSM2: CKR_GENERAL_ERROR). When the key
                    // still round-trips a probe, the input was at fault.
                    Err(err @ CkError::Pkcs11(rv, _)) if maybe_unauthentic(rv) => {
                        if round_trips(session, handle) {
                            Ok(None)
                        } else {
                            Err(err)
                        }
                    }
                    Err(err) => Err(err),
                }
            })
            .await?;
        opened.ok_or(KmsError::UnwrapFailed)
    }

    /// The key object exists on the token, is an AES key and may encrypt
    /// and decrypt.
    async fn check_key(&self, kek: KekRef<'_>) -> Result<(), KmsError> {
        let usable = self
            .on_key(kek.kms_key_arn, move |session, handle| {
                let attributes = session
                    .get_attributes(handle, &[AttributeType::Encrypt, AttributeType::Decrypt])?;
                Ok(attributes
                    .iter()
                    .all(|a| !matches!(a, Attribute::Encrypt(false) | Attribute::Decrypt(false))))
            })
            .await?;
        if usable {
            Ok(())
        } else {
            Err(KmsError::KeyDisabled {
                key: kek.kms_key_arn.to_owned(),
            })
        }
    }
}

/// The wrap's AAD: label, KEK reference, record id, context.
fn wrap_aad(kek: KekRef<'_>, context: &EncryptionContext) -> Vec<u8> {
    let mut aad = Vec::with_capacity(
        WRAP_AAD_LABEL.len()
            + 8
            + kek.kms_key_arn.len()
            + kek.record_id.len()
            + context.canonical_len(),
    );
    aad.extend_from_slice(WRAP_AAD_LABEL);
    put_bytes(&mut aad, kek.kms_key_arn.as_bytes());
    put_bytes(&mut aad, kek.record_id.as_bytes());
    context.write_canonical(&mut aad);
    aad
}

/// The module at `path`, loaded and initialized once per process and kept
/// for its lifetime: a PKCS#11 module is process-wide state (one
/// `C_Initialize`, one login per token), and dropping a context would
/// `C_Finalize` it under every other user in the process.
fn loaded(path: &std::path::Path) -> Result<Pkcs11, CkError> {
    static MODULES: std::sync::OnceLock<Mutex<HashMap<std::path::PathBuf, Pkcs11>>> =
        std::sync::OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(context) = modules.get(path) {
        return Ok(context.clone());
    }
    let context = Pkcs11::new(path)?;
    match context.initialize(CInitializeArgs::OsThreads) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(err) => return Err(err),
    }
    modules.insert(path.to_owned(), context.clone());
    Ok(context)
}

/// One token: the module, its slot, the PIN, the sessions and the handles.
struct Token {
    context: Pkcs11,
    slot: Slot,
    label: String,
    pin: super::Pkcs11Pin,
    idle: Mutex<Vec<Session>>,
    permits: Semaphore,
    handles: Mutex<HashMap<String, ObjectHandle>>,
}

impl Token {
    /// Loads the module and finds the token by label (blocking).
    fn open(settings: Pkcs11Settings) -> Result<Self, KmsError> {
        let module = settings.module.display().to_string();
        let unavailable = |what: &str, err: CkError| KmsError::Unavailable {
            reason: format!("PKCS#11 module {module}: {what}: {err}"),
        };
        let context = loaded(&settings.module).map_err(|err| unavailable("cannot load it", err))?;
        let slots = context
            .get_slots_with_token()
            .map_err(|err| unavailable("cannot list its slots", err))?;
        let slot = slots
            .into_iter()
            .find(|slot| {
                context
                    .get_token_info(*slot)
                    .is_ok_and(|info| info.label().trim_end() == settings.token)
            })
            .ok_or_else(|| KmsError::Unavailable {
                reason: format!(
                    "PKCS#11 module {module} has no token labelled {:?} (--pkcs11-token)",
                    settings.token
                ),
            })?;
        Ok(Self {
            context,
            slot,
            label: settings.token,
            pin: settings.pin,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(settings.sessions.max(1)),
            handles: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `op` with a session of the pool on a blocking thread, at most
    /// as many at once as there are sessions; maps a failure to a
    /// [`KmsError`] naming `key`.
    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        key: &str,
        mut op: impl FnMut(&Token, &Session) -> Result<T, CkError> + Send + 'static,
    ) -> Result<T, KmsError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| KmsError::Unavailable {
                reason: "the PKCS#11 session pool is closed".into(),
            })?;
        let token = Arc::clone(self);
        let outcome = tokio::task::spawn_blocking(move || {
            let session = token.session()?;
            let mut outcome = op(&token, &session);
            if matches!(&outcome, Err(CkError::Pkcs11(rv, _)) if handle_lost(*rv)) {
                // A module may issue new handles after a new login: the
                // object is looked up again, once.
                token.forget_handles();
                outcome = op(&token, &session);
            }
            match &outcome {
                Err(CkError::Pkcs11(rv, _)) if session_lost(*rv) => drop(session),
                Err(CkError::Pkcs11(rv, _)) if handle_lost(*rv) => {
                    token.forget_handles();
                    token.put_back(session);
                }
                _ => token.put_back(session),
            }
            outcome
        })
        .await
        .map_err(|err| KmsError::Unavailable {
            reason: format!("a PKCS#11 call for key {key} did not finish: {err}"),
        })?;
        outcome.map_err(|err| self.error(key, err))
    }

    /// An idle session, or a new one, logged in as the user: a login holds
    /// for every session of the process until a logout (or the last
    /// session closing) ends it, so an idle session is logged in again when
    /// it lost it.
    fn session(&self) -> Result<Session, CkError> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let session = match idle {
            Some(session) => match session.get_session_info() {
                Ok(info) if info.session_state() == SessionState::RwUser => return Ok(session),
                Ok(_) => session,
                // Gone with the token: a new one.
                Err(_) => self.context.open_rw_session(self.slot)?,
            },
            None => self.context.open_rw_session(self.slot)?,
        };
        let pin = AuthPin::new(self.pin.expose().into());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(err) => Err(err),
        }
    }

    fn forget_handles(&self) {
        if let Ok(mut handles) = self.handles.lock() {
            handles.clear();
        }
    }

    fn put_back(&self, session: Session) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(session);
        }
    }

    /// The handle of the AES key object labelled `label`.
    fn handle(&self, session: &Session, label: &str) -> Result<ObjectHandle, CkError> {
        if let Some(handle) = self.handles.lock().ok().and_then(|h| h.get(label).copied()) {
            return Ok(handle);
        }
        let handle = self.find(session, label)?.ok_or(CkError::Pkcs11(
            RvError::KeyHandleInvalid,
            cryptoki::context::Function::FindObjects,
        ))?;
        if let Ok(mut handles) = self.handles.lock() {
            handles.insert(label.to_owned(), handle);
        }
        Ok(handle)
    }

    /// The AES key object labelled `label`, if the token has exactly one.
    fn find(&self, session: &Session, label: &str) -> Result<Option<ObjectHandle>, CkError> {
        let found = session.find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(label.as_bytes().to_vec()),
        ])?;
        Ok(match found.as_slice() {
            [one] => Some(*one),
            _ => None,
        })
    }

    fn error(&self, key: &str, err: CkError) -> KmsError {
        let token = &self.label;
        match err {
            CkError::Pkcs11(rv, _) if pin_refused(rv) => KmsError::NotConfigured {
                provider: ProviderKind::Pkcs11,
                reason: format!(
                    "token {token} refused this process's PIN ({rv:?}) for key {key}: check \
                     --pkcs11-pin-file / KEYWARD_PKCS11_PIN, or unlock the token"
                ),
            },
            CkError::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _) => {
                KmsError::KeyNotFound {
                    key: format!("{key} (no AES key object with that label on token {token})"),
                }
            }
            CkError::Pkcs11(rv, function) => KmsError::Unavailable {
                reason: format!("token {token}, key {key}: {function:?} failed with {rv:?}"),
            },
            other => KmsError::Unavailable {
                reason: format!("token {token}, key {key}: {other}"),
            },
        }
    }
}

/// What a module may answer when a GCM tag does not verify.
fn maybe_unauthentic(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::EncryptedDataInvalid
            | RvError::EncryptedDataLenRange
            | RvError::DataInvalid
            | RvError::DataLenRange
            | RvError::GeneralError
            | RvError::FunctionFailed
    )
}

/// Whether `key` seals and opens a probe of zeros now: a module that
/// answered a decryption with a general failure is working, and the
/// ciphertext did not authenticate.
fn round_trips(session: &Session, key: ObjectHandle) -> bool {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let probe = [0u8; KEY_LEN];
    let sealed = GcmParams::new(&mut nonce, &[], TAG_BITS.into())
        .and_then(|params| session.encrypt(&Mechanism::AesGcm(params), key, &probe));
    let Ok(sealed) = sealed else {
        return false;
    };
    GcmParams::new(&mut nonce, &[], TAG_BITS.into())
        .and_then(|params| session.decrypt(&Mechanism::AesGcm(params), key, &sealed))
        .is_ok_and(|opened| opened == probe)
}

fn pin_refused(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::PinIncorrect
            | RvError::PinLocked
            | RvError::PinExpired
            | RvError::PinInvalid
            | RvError::PinLenRange
    )
}

/// The session is gone with the token or the module's state.
fn session_lost(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::TokenNotPresent
            | RvError::UserNotLoggedIn
            | RvError::CryptokiNotInitialized
    ) || pin_refused(rv)
}

/// A cached object handle no longer names the object.
fn handle_lost(rv: RvError) -> bool {
    matches!(rv, RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid)
}
