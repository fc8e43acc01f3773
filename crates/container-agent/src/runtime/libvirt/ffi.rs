//! The few calls of libvirt's C API the runtime needs, from `libvirt.so.0`
//! loaded at run time: the agent builds and runs on hosts without libvirt,
//! which then report the runtime unavailable with the loader's reason. All
//! of the agent's unsafe code for libvirt is in this module.
//!
//! Every call blocks (libvirt talks to its daemon synchronously): callers run
//! them on blocking threads. libvirt keeps its last error per thread, so an
//! error is read on the thread whose call failed.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{
    CStr, CString, c_char, c_int, c_longlong, c_uint, c_ulong, c_ulonglong, c_ushort, c_void,
};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

const LIBRARY_NAME: &str = "libvirt.so.0";
/// libvirt's QEMU-specific calls (the guest agent's), a library of its own.
const QEMU_LIBRARY_NAME: &str = "libvirt-qemu.so.0";
/// `VIR_UUID_STRING_BUFLEN`: 36 characters and the NUL.
const UUID_STRING_LEN: usize = 37;
/// `VIR_DOMAIN_METADATA_ELEMENT`: the `<metadata>` child in a namespace.
const METADATA_ELEMENT: c_int = 2;

/// libvirt error numbers the runtime tells apart (`virErrorNumber`).
pub mod code {
    pub const INVALID_ARG: i32 = 8;
    pub const OPERATION_FAILED: i32 = 9;
    pub const XML_ERROR: i32 = 27;
    pub const DOM_EXIST: i32 = 28;
    pub const XML_DETAIL: i32 = 35;
    pub const NO_DOMAIN: i32 = 42;
    pub const NO_NETWORK: i32 = 43;
    pub const OPERATION_INVALID: i32 = 55;
    pub const CONFIG_UNSUPPORTED: i32 = 67;
    pub const NO_DOMAIN_METADATA: i32 = 80;
    pub const OPERATION_UNSUPPORTED: i32 = 84;
}

/// `virDomainState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    NoState,
    Running,
    Blocked,
    Paused,
    ShuttingDown,
    Shutoff,
    Crashed,
    Suspended,
}

impl DomainState {
    fn from_raw(raw: c_int) -> Self {
        match raw {
            1 => Self::Running,
            2 => Self::Blocked,
            3 => Self::Paused,
            4 => Self::ShuttingDown,
            5 => Self::Shutoff,
            6 => Self::Crashed,
            7 => Self::Suspended,
            _ => Self::NoState,
        }
    }

    /// The domain has a live instance (a qemu process) in this state.
    pub fn is_active(self) -> bool {
        !matches!(self, Self::Shutoff | Self::Crashed | Self::NoState)
    }
}

/// `virDomainShutoffReason` values the runtime tells apart.
pub mod shutoff_reason {
    pub const UNKNOWN: i32 = 0;
    pub const SHUTDOWN: i32 = 1;
    pub const DESTROYED: i32 = 2;
    pub const CRASHED: i32 = 3;
    pub const MIGRATED: i32 = 4;
    pub const SAVED: i32 = 5;
    pub const FAILED: i32 = 6;
    pub const FROM_SNAPSHOT: i32 = 7;
    pub const DAEMON: i32 = 8;
}

/// A failed call: libvirt's error number and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirError {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for VirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The first fields of `virError`; libvirt owns the struct, we only read it.
#[repr(C)]
struct RawError {
    code: c_int,
    domain: c_int,
    message: *const c_char,
}

/// `virDomainInfo`. The state comes from `virDomainGetState`, which also
/// gives its reason; the other unread fields keep the C layout.
#[repr(C)]
#[derive(Default)]
#[allow(dead_code)]
struct RawDomainInfo {
    state: u8,
    max_mem_kib: c_ulong,
    memory_kib: c_ulong,
    vcpus: c_ushort,
    cpu_time_ns: c_ulonglong,
}

/// What `virDomainGetInfo` and `virDomainGetState` report.
#[derive(Debug, Clone, Copy)]
pub struct DomainInfo {
    pub state: DomainState,
    /// Why the domain is in its state (`virDomain*Reason` of that state).
    pub reason: i32,
    pub max_memory_kib: u64,
    pub vcpus: u32,
}

/// `virTypedParameter`: a named value of one of several types.
#[repr(C)]
struct RawTypedParameter {
    field: [c_char; 80],
    kind: c_int,
    value: RawTypedValue,
}

#[repr(C)]
#[derive(Clone, Copy)]
union RawTypedValue {
    int: c_int,
    uint: c_uint,
    long: c_longlong,
    ulong: c_ulonglong,
    double: f64,
    boolean: c_char,
    string: *mut c_char,
}

/// `virDomainStatsRecord`: one domain's statistics.
#[repr(C)]
struct RawStatsRecord {
    domain: Ptr,
    params: *mut RawTypedParameter,
    count: c_int,
}

/// `virDomainInterface`: a guest network interface and its addresses.
#[repr(C)]
struct RawInterface {
    name: *mut c_char,
    hwaddr: *mut c_char,
    address_count: c_uint,
    addresses: *mut RawIpAddress,
}

/// `virDomainIPAddress`.
#[repr(C)]
struct RawIpAddress {
    kind: c_int,
    address: *mut c_char,
    prefix: c_uint,
}

/// The groups of `virDomainListGetStats` (`virDomainStatsTypes`) the runtime asks for.
pub mod stats_group {
    pub const CPU_TOTAL: u32 = 1 << 1;
    pub const BALLOON: u32 = 1 << 2;
    pub const INTERFACE: u32 = 1 << 4;
    pub const BLOCK: u32 = 1 << 5;
}

/// Where `virDomainInterfaceAddresses` looks (`virDomainInterfaceAddressesSource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressSource {
    /// The DHCP leases of a libvirt-managed network.
    Lease = 0,
    /// The host's ARP table (any network, once the guest has sent traffic).
    Arp = 2,
}

/// A guest network interface as libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// `address/prefix`, e.g. `192.168.122.45/24`.
    pub addresses: Vec<String>,
}

type Ptr = *mut c_void;

/// `VIR_DOMAIN_EVENT_ID_LIFECYCLE`: a domain started, stopped, crashed,
/// was defined or undefined, …
const EVENT_ID_LIFECYCLE: c_int = 0;

/// `virConnectDomainEventCallback`, the lifecycle event's callback, which
/// libvirt takes as its generic callback type (the same C pointer).
type LifecycleCallback = extern "C" fn(Ptr, Ptr, c_int, c_int, *mut c_void) -> c_int;
/// `virConnectCloseFunc`.
type CloseCallback = extern "C" fn(Ptr, c_int, *mut c_void);
/// `virFreeCallback`.
type FreeCallback = extern "C" fn(*mut c_void);

/// What an event calls: it runs on libvirt's event loop thread, so it only
/// hands the news on.
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// `unsigned long` is 32 bits on some targets, 64 on this one.
#[allow(clippy::useless_conversion)]
fn widen(value: c_ulong) -> u64 {
    u64::from(value)
}

/// The resolved entry points. Function pointers stay valid because the
/// library is never unloaded (it lives in a `static`).
struct Api {
    connect_open: unsafe extern "C" fn(*const c_char) -> Ptr,
    connect_close: unsafe extern "C" fn(Ptr) -> c_int,
    connect_is_alive: unsafe extern "C" fn(Ptr) -> c_int,
    connect_get_type: unsafe extern "C" fn(Ptr) -> *const c_char,
    connect_list_all_domains: unsafe extern "C" fn(Ptr, *mut *mut Ptr, c_uint) -> c_int,
    connect_get_domain_capabilities: unsafe extern "C" fn(
        Ptr,
        *const c_char,
        *const c_char,
        *const c_char,
        *const c_char,
        c_uint,
    ) -> *mut c_char,
    domain_define_xml: unsafe extern "C" fn(Ptr, *const c_char) -> Ptr,
    domain_create: unsafe extern "C" fn(Ptr) -> c_int,
    domain_shutdown: unsafe extern "C" fn(Ptr) -> c_int,
    domain_destroy: unsafe extern "C" fn(Ptr) -> c_int,
    domain_undefine: unsafe extern "C" fn(Ptr) -> c_int,
    domain_lookup_by_name: unsafe extern "C" fn(Ptr, *const c_char) -> Ptr,
    domain_lookup_by_uuid_string: unsafe extern "C" fn(Ptr, *const c_char) -> Ptr,
    domain_get_info: unsafe extern "C" fn(Ptr, *mut RawDomainInfo) -> c_int,
    domain_get_state: unsafe extern "C" fn(Ptr, *mut c_int, *mut c_int, c_uint) -> c_int,
    domain_get_name: unsafe extern "C" fn(Ptr) -> *const c_char,
    domain_get_uuid_string: unsafe extern "C" fn(Ptr, *mut c_char) -> c_int,
    domain_get_metadata: unsafe extern "C" fn(Ptr, c_int, *const c_char, c_uint) -> *mut c_char,
    domain_set_metadata: unsafe extern "C" fn(
        Ptr,
        c_int,
        *const c_char,
        *const c_char,
        *const c_char,
        c_uint,
    ) -> c_int,
    domain_free: unsafe extern "C" fn(Ptr) -> c_int,
    domain_get_xml_desc: unsafe extern "C" fn(Ptr, c_uint) -> *mut c_char,
    domain_list_get_stats:
        unsafe extern "C" fn(*mut Ptr, c_uint, *mut *mut *mut RawStatsRecord, c_uint) -> c_int,
    domain_stats_record_list_free: unsafe extern "C" fn(*mut *mut RawStatsRecord),
    domain_interface_addresses:
        unsafe extern "C" fn(Ptr, *mut *mut *mut RawInterface, c_uint, c_uint) -> c_int,
    domain_interface_free: unsafe extern "C" fn(*mut RawInterface),
    connect_domain_event_register_any: unsafe extern "C" fn(
        Ptr,
        Ptr,
        c_int,
        LifecycleCallback,
        *mut c_void,
        FreeCallback,
    ) -> c_int,
    connect_domain_event_deregister_any: unsafe extern "C" fn(Ptr, c_int) -> c_int,
    connect_register_close_callback:
        unsafe extern "C" fn(Ptr, CloseCallback, *mut c_void, FreeCallback) -> c_int,
    connect_unregister_close_callback: unsafe extern "C" fn(Ptr, CloseCallback) -> c_int,
    get_last_error: unsafe extern "C" fn() -> *const RawError,
    reset_last_error: unsafe extern "C" fn(),
}

/// `virDomainQemuAgentCommand` (libvirt-qemu.h).
type QemuAgentCommand = unsafe extern "C" fn(Ptr, *const c_char, c_int, c_uint) -> *mut c_char;

pub struct Library {
    api: Api,
    /// The guest agent's entry point from libvirt-qemu, with the library
    /// that keeps it mapped; why not when that library does not load.
    qemu_agent: Result<(QemuAgentCommand, libloading::Library), String>,
    /// Whether libvirt's event loop runs (on a thread of its own): events
    /// can be subscribed to; why not otherwise.
    events: Result<(), String>,
    /// Keeps the entry points in `api` mapped.
    _library: libloading::Library,
}

static LIBRARY: OnceLock<Result<Library, String>> = OnceLock::new();

/// libvirt, loaded and initialised once per process; the loader's reason
/// when the host has no libvirt.
pub fn library() -> Result<&'static Library, String> {
    LIBRARY
        .get_or_init(load)
        .as_ref()
        .map_err(|why| format!("cannot load {LIBRARY_NAME}: {why}"))
}

/// Resolves one symbol as a function pointer of type `F`.
///
/// # Safety
/// `F` must be the exact C signature of `name` in libvirt's headers.
unsafe fn symbol<F: Copy>(library: &libloading::Library, name: &str) -> Result<F, String> {
    // SAFETY: the caller guarantees that F matches the symbol's C signature;
    // the pointer outlives its use because the library stays loaded.
    unsafe { library.get::<F>(name.as_bytes()) }
        .map(|symbol| *symbol)
        .map_err(|e| format!("{name}: {e}"))
}

extern "C" fn ignore_error(_user_data: *mut c_void, _error: *const RawError) {}

fn load() -> Result<Library, String> {
    // SAFETY: loading libvirt runs its ELF constructors, which only set up
    // its own global state.
    let library = unsafe { libloading::Library::new(LIBRARY_NAME) }.map_err(|e| e.to_string())?;
    // SAFETY: each signature below is copied from libvirt 9's headers
    // (libvirt-host.h, libvirt-domain.h, libvirt-common.h, virterror.h); every
    // one of these functions exists since libvirt 1.2.8 (virDomainListGetStats
    // is the newest).
    let api = unsafe {
        Api {
            connect_open: symbol(&library, "virConnectOpen")?,
            connect_close: symbol(&library, "virConnectClose")?,
            connect_is_alive: symbol(&library, "virConnectIsAlive")?,
            connect_get_type: symbol(&library, "virConnectGetType")?,
            connect_list_all_domains: symbol(&library, "virConnectListAllDomains")?,
            connect_get_domain_capabilities: symbol(&library, "virConnectGetDomainCapabilities")?,
            domain_define_xml: symbol(&library, "virDomainDefineXML")?,
            domain_create: symbol(&library, "virDomainCreate")?,
            domain_shutdown: symbol(&library, "virDomainShutdown")?,
            domain_destroy: symbol(&library, "virDomainDestroy")?,
            domain_undefine: symbol(&library, "virDomainUndefine")?,
            domain_lookup_by_name: symbol(&library, "virDomainLookupByName")?,
            domain_lookup_by_uuid_string: symbol(&library, "virDomainLookupByUUIDString")?,
            domain_get_info: symbol(&library, "virDomainGetInfo")?,
            domain_get_state: symbol(&library, "virDomainGetState")?,
            domain_get_name: symbol(&library, "virDomainGetName")?,
            domain_get_uuid_string: symbol(&library, "virDomainGetUUIDString")?,
            domain_get_metadata: symbol(&library, "virDomainGetMetadata")?,
            domain_set_metadata: symbol(&library, "virDomainSetMetadata")?,
            domain_free: symbol(&library, "virDomainFree")?,
            domain_get_xml_desc: symbol(&library, "virDomainGetXMLDesc")?,
            domain_list_get_stats: symbol(&library, "virDomainListGetStats")?,
            domain_stats_record_list_free: symbol(&library, "virDomainStatsRecordListFree")?,
            domain_interface_addresses: symbol(&library, "virDomainInterfaceAddresses")?,
            domain_interface_free: symbol(&library, "virDomainInterfaceFree")?,
            connect_domain_event_register_any: symbol(
                &library,
                "virConnectDomainEventRegisterAny",
            )?,
            connect_domain_event_deregister_any: symbol(
                &library,
                "virConnectDomainEventDeregisterAny",
            )?,
            connect_register_close_callback: symbol(&library, "virConnectRegisterCloseCallback")?,
            connect_unregister_close_callback: symbol(
                &library,
                "virConnectUnregisterCloseCallback",
            )?,
            get_last_error: symbol(&library, "virGetLastError")?,
            reset_last_error: symbol(&library, "virResetLastError")?,
        }
    };
    // SAFETY: virInitialize takes no arguments and must run before threads
    // share libvirt; virSetErrorFunc stores a handler that ignores its
    // arguments, so libvirt stops printing every error to stderr (the agent
    // reports errors itself).
    unsafe {
        let initialize: unsafe extern "C" fn() -> c_int = symbol(&library, "virInitialize")?;
        if initialize() < 0 {
            return Err("virInitialize failed".to_string());
        }
        let set_error_func: unsafe extern "C" fn(
            *mut c_void,
            Option<extern "C" fn(*mut c_void, *const RawError)>,
        ) = symbol(&library, "virSetErrorFunc")?;
        set_error_func(std::ptr::null_mut(), Some(ignore_error));
    }
    let qemu_agent = load_qemu_agent();
    let events = start_event_loop(&library);
    if let Err(why) = &events {
        tracing::warn!(%why, "libvirt events unavailable: domains are polled");
    }
    Ok(Library {
        api,
        qemu_agent,
        events,
        _library: library,
    })
}

/// The guest agent's call from libvirt-qemu, which libvirt's packages ship
/// next to libvirt (Debian: libvirt0).
fn load_qemu_agent() -> Result<(QemuAgentCommand, libloading::Library), String> {
    // SAFETY: as for libvirt itself: its constructors set up its own state.
    let library = unsafe { libloading::Library::new(QEMU_LIBRARY_NAME) }
        .map_err(|e| format!("cannot load {QEMU_LIBRARY_NAME}: {e}"))?;
    // SAFETY: the signature of virDomainQemuAgentCommand in libvirt-qemu.h
    // (since libvirt 0.10.0).
    let command = unsafe { symbol(&library, "virDomainQemuAgentCommand")? };
    Ok((command, library))
}

/// Registers libvirt's default event loop (before any connection is
/// opened, as libvirt requires) and runs it on a thread of its own for the
/// life of the process: events and close callbacks are dispatched there.
fn start_event_loop(library: &libloading::Library) -> Result<(), String> {
    // SAFETY: both take no arguments (libvirt-event.h); the registration
    // happens once, here, before any connection exists.
    let (register, run) = unsafe {
        let register: unsafe extern "C" fn() -> c_int =
            symbol(library, "virEventRegisterDefaultImpl")?;
        let run: unsafe extern "C" fn() -> c_int = symbol(library, "virEventRunDefaultImpl")?;
        (register, run)
    };
    // SAFETY: as above.
    if unsafe { register() } < 0 {
        return Err("virEventRegisterDefaultImpl failed".to_string());
    }
    std::thread::Builder::new()
        .name("libvirt-events".to_string())
        .spawn(move || {
            loop {
                // SAFETY: the default implementation is registered; one
                // thread runs its iterations.
                if unsafe { run() } < 0 {
                    // An iteration that fails (e.g. poll interrupted) is
                    // tried again, not too fast.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        })
        .map(drop)
        .map_err(|e| format!("cannot start libvirt's event loop thread: {e}"))
}

extern "C" fn on_lifecycle(
    _connection: Ptr,
    _domain: Ptr,
    _event: c_int,
    _detail: c_int,
    wake: *mut c_void,
) -> c_int {
    // SAFETY: `wake` is the Box<Wake> registered with this callback, freed
    // only by `free_wake` once libvirt no longer calls it.
    unsafe { (*wake.cast::<Wake>())() };
    0
}

extern "C" fn on_close(_connection: Ptr, _reason: c_int, wake: *mut c_void) {
    // SAFETY: as in on_lifecycle.
    unsafe { (*wake.cast::<Wake>())() };
}

extern "C" fn free_wake(wake: *mut c_void) {
    // SAFETY: libvirt frees each registration's opaque pointer once; it is
    // a Box<Wake> from Box::into_raw.
    drop(unsafe { Box::from_raw(wake.cast::<Wake>()) });
}

impl Library {
    /// This thread's last libvirt error, then clears it.
    fn last_error(&self) -> VirError {
        // SAFETY: virGetLastError returns null or a pointer to this thread's
        // error, valid until the next libvirt call on this thread; the
        // message is copied before that.
        unsafe {
            let raw = (self.api.get_last_error)();
            let error = match raw.as_ref() {
                Some(raw) => VirError {
                    code: raw.code,
                    message: owned_string(raw.message)
                        .unwrap_or_else(|| format!("libvirt error {}", raw.code)),
                },
                None => VirError {
                    code: 0,
                    message: "libvirt call failed without saying why".to_string(),
                },
            };
            (self.api.reset_last_error)();
            error
        }
    }

    pub fn open(&'static self, uri: &str) -> Result<Connection, VirError> {
        let uri = c_string(uri)?;
        // SAFETY: `uri` is a valid NUL-terminated string for the call.
        let ptr = unsafe { (self.api.connect_open)(uri.as_ptr()) };
        NonNull::new(ptr)
            .map(|ptr| Connection { library: self, ptr })
            .ok_or_else(|| self.last_error())
    }
}

/// Copies a C string libvirt lent us.
///
/// # Safety
/// `ptr` must be null or point to a NUL-terminated string.
unsafe fn owned_string(ptr: *const c_char) -> Option<String> {
    // SAFETY: guaranteed by the caller.
    (!ptr.is_null()).then(|| {
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    })
}

fn c_string(text: &str) -> Result<CString, VirError> {
    CString::new(text).map_err(|_| VirError {
        code: code::INVALID_ARG,
        message: format!("`{}` contains a NUL byte", text.escape_debug()),
    })
}

/// An open connection (`virConnectPtr`), closed on drop.
pub struct Connection {
    library: &'static Library,
    ptr: NonNull<c_void>,
}

// SAFETY: libvirt connections are thread-safe (since 0.6.0): calls on one
// connection from several threads are serialised by libvirt itself.
unsafe impl Send for Connection {}
// SAFETY: as above; every method takes &self and libvirt locks internally.
unsafe impl Sync for Connection {}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from virConnectOpen and is closed exactly once.
        unsafe { (self.library.api.connect_close)(self.ptr.as_ptr()) };
    }
}

impl Connection {
    fn api(&self) -> &Api {
        &self.library.api
    }

    fn domain(&self, ptr: Ptr) -> Result<Domain<'_>, VirError> {
        NonNull::new(ptr)
            .map(|ptr| Domain {
                connection: self,
                ptr,
            })
            .ok_or_else(|| self.library.last_error())
    }

    /// False once the connection to the daemon broke.
    pub fn is_alive(&self) -> bool {
        // SAFETY: `ptr` is an open connection.
        unsafe { (self.api().connect_is_alive)(self.ptr.as_ptr()) == 1 }
    }

    /// The hypervisor driver's name, e.g. "QEMU" or "TEST".
    pub fn driver(&self) -> Result<String, VirError> {
        // SAFETY: `ptr` is an open connection; the returned string is static
        // in libvirt and is copied, never freed.
        unsafe { owned_string((self.api().connect_get_type)(self.ptr.as_ptr())) }
            .ok_or_else(|| self.library.last_error())
    }

    /// The domain capabilities XML for domains of type `virt_type` (e.g.
    /// "kvm") with the daemon's default emulator, arch and machine; an
    /// error when the hypervisor cannot run that type here (e.g. "KVM is
    /// not supported by '…' on this host").
    pub fn domain_capabilities(&self, virt_type: &str) -> Result<String, VirError> {
        let virt_type = c_string(virt_type)?;
        // SAFETY: valid connection; null emulator, arch and machine ask for
        // the defaults; the returned string is malloc'd by libvirt, copied,
        // then freed with free() as libvirt documents.
        unsafe {
            let ptr = (self.api().connect_get_domain_capabilities)(
                self.ptr.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
                virt_type.as_ptr(),
                0,
            );
            if ptr.is_null() {
                return Err(self.library.last_error());
            }
            let text = owned_string(ptr);
            libc::free(ptr.cast());
            text.ok_or_else(|| self.library.last_error())
        }
    }

    pub fn list_domains(&self) -> Result<Vec<Domain<'_>>, VirError> {
        let mut array: *mut Ptr = std::ptr::null_mut();
        // SAFETY: libvirt allocates `array` (with malloc) and fills it with
        // `count` domain references, each ours to free.
        let count =
            unsafe { (self.api().connect_list_all_domains)(self.ptr.as_ptr(), &mut array, 0) };
        let Ok(count) = usize::try_from(count) else {
            return Err(self.library.last_error());
        };
        let mut domains = Vec::with_capacity(count);
        // SAFETY: `array` holds `count` non-null pointers; each is wrapped
        // once (freed by Domain's drop) and the array itself freed with
        // free(), as libvirt documents.
        unsafe {
            for index in 0..count {
                domains.extend(self.domain(*array.add(index)));
            }
            libc::free(array.cast());
        }
        Ok(domains)
    }

    pub fn define(&self, xml: &str) -> Result<Domain<'_>, VirError> {
        let xml = c_string(xml)?;
        // SAFETY: valid connection and NUL-terminated XML.
        self.domain(unsafe { (self.api().domain_define_xml)(self.ptr.as_ptr(), xml.as_ptr()) })
    }

    /// `Ok(None)` when there is no such domain.
    pub fn lookup_by_name(&self, name: &str) -> Result<Option<Domain<'_>>, VirError> {
        let name = c_string(name)?;
        // SAFETY: valid connection and NUL-terminated name.
        let ptr = unsafe { (self.api().domain_lookup_by_name)(self.ptr.as_ptr(), name.as_ptr()) };
        none_if_missing(self.domain(ptr))
    }

    /// `Ok(None)` when there is no such domain.
    pub fn lookup_by_uuid(&self, uuid: &str) -> Result<Option<Domain<'_>>, VirError> {
        let uuid = c_string(uuid)?;
        // SAFETY: valid connection and NUL-terminated UUID string.
        let ptr =
            unsafe { (self.api().domain_lookup_by_uuid_string)(self.ptr.as_ptr(), uuid.as_ptr()) };
        none_if_missing(self.domain(ptr))
    }
}

/// A connection's lifecycle events and its close, each calling `wake`, until
/// dropped.
pub struct Subscription {
    connection: Arc<Connection>,
    callback: c_int,
}

impl Connection {
    /// Calls `wake` on every lifecycle event of any domain, and when the
    /// connection closes (the daemon went away); an error when libvirt's
    /// event loop does not run or the driver has no events.
    pub fn subscribe(self: &Arc<Self>, wake: Wake) -> Result<Subscription, VirError> {
        if let Err(why) = &self.library.events {
            return Err(VirError {
                code: code::OPERATION_UNSUPPORTED,
                message: why.clone(),
            });
        }
        let opaque = || Box::into_raw(Box::new(wake.clone())).cast::<c_void>();
        // SAFETY: valid connection; a null domain asks for every domain's
        // events; `opaque` is freed by libvirt with free_wake, also when
        // the registration fails.
        let callback = unsafe {
            (self.api().connect_domain_event_register_any)(
                self.ptr.as_ptr(),
                std::ptr::null_mut(),
                EVENT_ID_LIFECYCLE,
                on_lifecycle,
                opaque(),
                free_wake,
            )
        };
        if callback < 0 {
            return Err(self.library.last_error());
        }
        let subscription = Subscription {
            connection: self.clone(),
            callback,
        };
        // SAFETY: as above, for the close callback.
        let status = unsafe {
            (self.api().connect_register_close_callback)(
                self.ptr.as_ptr(),
                on_close,
                opaque(),
                free_wake,
            )
        };
        if status < 0 {
            return Err(self.library.last_error());
        }
        Ok(subscription)
    }
}

impl Subscription {
    /// False once the subscribed connection broke: its events stopped.
    pub fn is_alive(&self) -> bool {
        self.connection.is_alive()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let ptr = self.connection.ptr.as_ptr();
        // SAFETY: the ids registered in `subscribe`, each removed once. On a
        // broken connection libvirt may refuse; the connection then keeps
        // its callbacks until it is freed.
        unsafe {
            (self.connection.api().connect_unregister_close_callback)(ptr, on_close);
            (self.connection.api().connect_domain_event_deregister_any)(ptr, self.callback);
        }
    }
}

fn none_if_missing<T>(found: Result<T, VirError>) -> Result<Option<T>, VirError> {
    match found {
        Ok(found) => Ok(Some(found)),
        Err(error) if error.code == code::NO_DOMAIN => Ok(None),
        Err(error) => Err(error),
    }
}

/// A domain reference (`virDomainPtr`), freed on drop; the domain itself
/// stays.
pub struct Domain<'c> {
    connection: &'c Connection,
    ptr: NonNull<c_void>,
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        // SAFETY: `ptr` is a domain reference we own, freed exactly once.
        unsafe { (self.api().domain_free)(self.ptr.as_ptr()) };
    }
}

impl Domain<'_> {
    fn api(&self) -> &Api {
        self.connection.api()
    }

    /// Turns a C status (negative on failure) into a result.
    fn check(&self, status: c_int) -> Result<(), VirError> {
        if status < 0 {
            Err(self.connection.library.last_error())
        } else {
            Ok(())
        }
    }

    pub fn name(&self) -> Result<String, VirError> {
        // SAFETY: valid domain; the name belongs to the domain object and is
        // copied before the domain is freed.
        unsafe { owned_string((self.api().domain_get_name)(self.ptr.as_ptr())) }
            .ok_or_else(|| self.connection.library.last_error())
    }

    pub fn uuid(&self) -> Result<String, VirError> {
        let mut buffer = [0 as c_char; UUID_STRING_LEN];
        // SAFETY: the buffer has the VIR_UUID_STRING_BUFLEN bytes libvirt writes.
        self.check(unsafe {
            (self.api().domain_get_uuid_string)(self.ptr.as_ptr(), buffer.as_mut_ptr())
        })?;
        // SAFETY: on success libvirt wrote a NUL-terminated string.
        Ok(unsafe { owned_string(buffer.as_ptr()) }.unwrap_or_default())
    }

    pub fn start(&self) -> Result<(), VirError> {
        // SAFETY: valid domain.
        self.check(unsafe { (self.api().domain_create)(self.ptr.as_ptr()) })
    }

    /// Asks the guest to shut down (ACPI); returns without waiting.
    pub fn shutdown(&self) -> Result<(), VirError> {
        // SAFETY: valid domain.
        self.check(unsafe { (self.api().domain_shutdown)(self.ptr.as_ptr()) })
    }

    /// Powers the domain off at once.
    pub fn destroy(&self) -> Result<(), VirError> {
        // SAFETY: valid domain.
        self.check(unsafe { (self.api().domain_destroy)(self.ptr.as_ptr()) })
    }

    pub fn undefine(&self) -> Result<(), VirError> {
        // SAFETY: valid domain.
        self.check(unsafe { (self.api().domain_undefine)(self.ptr.as_ptr()) })
    }

    pub fn info(&self) -> Result<DomainInfo, VirError> {
        let mut raw = RawDomainInfo::default();
        let (mut state, mut reason): (c_int, c_int) = (0, 0);
        // SAFETY: valid domain and out-pointers to initialised locals.
        unsafe {
            self.check((self.api().domain_get_info)(self.ptr.as_ptr(), &mut raw))?;
            self.check((self.api().domain_get_state)(
                self.ptr.as_ptr(),
                &mut state,
                &mut reason,
                0,
            ))?;
        }
        Ok(DomainInfo {
            state: DomainState::from_raw(state),
            reason,
            max_memory_kib: widen(raw.max_mem_kib),
            vcpus: u32::from(raw.vcpus),
        })
    }

    /// Our `<metadata>` element in namespace `uri` (of the live definition
    /// when the domain runs); `Ok(None)` when the domain has none.
    pub fn metadata(&self, uri: &str) -> Result<Option<String>, VirError> {
        let uri = c_string(uri)?;
        // SAFETY: valid domain and URI; the returned string is malloc'd by
        // libvirt, copied, then freed with free() as libvirt documents.
        unsafe {
            let ptr = (self.api().domain_get_metadata)(
                self.ptr.as_ptr(),
                METADATA_ELEMENT,
                uri.as_ptr(),
                0,
            );
            if ptr.is_null() {
                let error = self.connection.library.last_error();
                return if error.code == code::NO_DOMAIN_METADATA {
                    Ok(None)
                } else {
                    Err(error)
                };
            }
            let text = owned_string(ptr);
            libc::free(ptr.cast());
            Ok(text)
        }
    }

    /// Replaces our `<metadata>` element in namespace `uri` (prefix `key`)
    /// of the running domain only: it goes away when the domain stops.
    pub fn set_live_metadata(&self, xml: &str, key: &str, uri: &str) -> Result<(), VirError> {
        const AFFECT_LIVE: c_uint = 1;
        let (xml, key, uri) = (c_string(xml)?, c_string(key)?, c_string(uri)?);
        // SAFETY: valid domain and NUL-terminated strings.
        self.check(unsafe {
            (self.api().domain_set_metadata)(
                self.ptr.as_ptr(),
                METADATA_ELEMENT,
                xml.as_ptr(),
                key.as_ptr(),
                uri.as_ptr(),
                AFFECT_LIVE,
            )
        })
    }
}

impl Domain<'_> {
    /// The live domain XML (the definition when it does not run), with
    /// runtime details such as each virtio channel's `state`.
    pub fn xml(&self) -> Result<String, VirError> {
        // SAFETY: valid domain; the returned string is malloc'd by libvirt,
        // copied, then freed with free() as libvirt documents.
        unsafe {
            let ptr = (self.api().domain_get_xml_desc)(self.ptr.as_ptr(), 0);
            if ptr.is_null() {
                return Err(self.connection.library.last_error());
            }
            let text = owned_string(ptr);
            libc::free(ptr.cast());
            text.ok_or_else(|| self.connection.library.last_error())
        }
    }

    /// Sends one QMP-style command (JSON) to the qemu guest agent in the
    /// guest and returns its JSON answer; waits up to `timeout_s` seconds
    /// for the agent.
    pub fn guest_agent(&self, command: &str, timeout_s: i32) -> Result<String, VirError> {
        let call = match &self.connection.library.qemu_agent {
            Ok((call, _)) => *call,
            Err(why) => {
                return Err(VirError {
                    code: code::OPERATION_UNSUPPORTED,
                    message: why.clone(),
                });
            }
        };
        let command = c_string(command)?;
        // SAFETY: valid domain and NUL-terminated command; the answer is
        // malloc'd by libvirt, copied, then freed with free().
        unsafe {
            let ptr = call(self.ptr.as_ptr(), command.as_ptr(), timeout_s, 0);
            if ptr.is_null() {
                return Err(self.connection.library.last_error());
            }
            let text = owned_string(ptr);
            libc::free(ptr.cast());
            text.ok_or_else(|| self.connection.library.last_error())
        }
    }

    /// This domain's statistics of the `groups` ([`stats_group`]), as
    /// libvirt names them (`cpu.time`, `balloon.rss`, `block.0.rd.bytes`, …):
    /// the integer ones; others are left out.
    pub fn stats(&self, groups: u32) -> Result<HashMap<String, u64>, VirError> {
        let mut domains = [self.ptr.as_ptr(), std::ptr::null_mut()];
        let mut records: *mut *mut RawStatsRecord = std::ptr::null_mut();
        // SAFETY: `domains` is the NULL-terminated array libvirt wants; on
        // success it allocates `records`, a NULL-terminated array freed below
        // with virDomainStatsRecordListFree (which frees the parameters too).
        let count = unsafe {
            (self.api().domain_list_get_stats)(domains.as_mut_ptr(), groups, &mut records, 0)
        };
        if count < 0 {
            return Err(self.connection.library.last_error());
        }
        let mut values = HashMap::new();
        // SAFETY: `records` holds `count` valid records, each with `count`
        // parameters; every string read is copied before the free.
        unsafe {
            for index in 0..usize::try_from(count).unwrap_or(0) {
                let record = &**records.add(index);
                let params = usize::try_from(record.count).unwrap_or(0);
                for param in 0..params {
                    let param = &*record.params.add(param);
                    let value = match param.kind {
                        1 => u64::try_from(param.value.int).ok(),
                        2 => Some(u64::from(param.value.uint)),
                        3 => u64::try_from(param.value.long).ok(),
                        4 => Some(param.value.ulong),
                        _ => None,
                    };
                    if let (Some(value), Some(name)) = (value, owned_string(param.field.as_ptr())) {
                        values.insert(name, value);
                    }
                }
            }
            if !records.is_null() {
                (self.api().domain_stats_record_list_free)(records);
            }
        }
        Ok(values)
    }

    /// The guest's network interfaces and their IP addresses as `source`
    /// knows them.
    pub fn interfaces(&self, source: AddressSource) -> Result<Vec<Interface>, VirError> {
        let mut array: *mut *mut RawInterface = std::ptr::null_mut();
        // SAFETY: valid domain; on success libvirt allocates `array` with
        // `count` interfaces, each freed with virDomainInterfaceFree and the
        // array with free(), as libvirt documents.
        let count = unsafe {
            (self.api().domain_interface_addresses)(
                self.ptr.as_ptr(),
                &mut array,
                source as c_uint,
                0,
            )
        };
        let Ok(count) = usize::try_from(count) else {
            return Err(self.connection.library.last_error());
        };
        let mut interfaces = Vec::with_capacity(count);
        // SAFETY: as above; strings are copied before the frees.
        unsafe {
            for index in 0..count {
                let raw = *array.add(index);
                let interface = &*raw;
                let addresses = (0..interface.address_count as usize)
                    .filter_map(|n| {
                        let address = &*interface.addresses.add(n);
                        owned_string(address.address)
                            .map(|text| format!("{text}/{}", address.prefix))
                    })
                    .collect();
                interfaces.push(Interface {
                    name: owned_string(interface.name).unwrap_or_default(),
                    mac: owned_string(interface.hwaddr).unwrap_or_default(),
                    addresses,
                });
                (self.api().domain_interface_free)(raw);
            }
            libc::free(array.cast());
        }
        Ok(interfaces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_read_from_their_numbers() {
        assert_eq!(DomainState::from_raw(1), DomainState::Running);
        assert_eq!(DomainState::from_raw(5), DomainState::Shutoff);
        assert_eq!(DomainState::from_raw(99), DomainState::NoState);
        assert!(DomainState::Paused.is_active());
        assert!(!DomainState::Crashed.is_active());
    }

    #[test]
    fn typed_parameters_have_libvirts_layout() {
        // VIR_TYPED_PARAM_FIELD_LENGTH (80), the int type, then an 8-byte union.
        assert_eq!(std::mem::size_of::<RawTypedParameter>(), 96);
        assert_eq!(std::mem::offset_of!(RawTypedParameter, value), 88);
    }

    #[test]
    fn nul_bytes_are_refused_before_libvirt_sees_them() {
        assert_eq!(c_string("a\0b").unwrap_err().code, code::INVALID_ARG);
    }
}
