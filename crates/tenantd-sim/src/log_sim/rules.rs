//! What the model simulates: the fencing rules (new ones by default, each
//! old one a negative control) and the paths that write a tenant's objects.

/// The rules of docs/protocol.md and FENCING-DESIGN.md. `true` is the rule
/// tenantd follows; `false` is the behaviour before issue 26, kept as a
/// negative control the simulation must catch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// R1: every takeover fences. Off: a lock that says `released` is taken
    /// on the clean path (no fences, write from the end of the listed run,
    /// and a listed slot past it is reported as a gap).
    pub always_fence: bool,
    /// R2: a fence that finds its slot taken reads that slot (and applies it
    /// when it continues the chain) instead of listing again. Off: the
    /// claim starts over, which a lagging LIST makes endless.
    pub probe_taken_slots: bool,
    /// R3: a claim's epoch must be above every epoch another acquisition
    /// wrote (snapshot, log, probed fences), else it raises its own lock's
    /// epoch and claims again. Off: only a greater epoch stops it (as
    /// deposed, or as a corrupt tenant when the lock was absent), an equal
    /// one is accepted.
    pub strict_epochs: bool,
    /// R4: a slot is the uploader's when it carries its acquisition's
    /// token. Off: when it carries its epoch and slot number (a fence of an
    /// acquisition with the same epoch passes).
    pub token_identity: bool,
    /// A claim that fails after its acquisition drops the lease without
    /// `released`. Off: it releases the lock as clean (so the next holder
    /// skips fences without R1).
    pub failed_claim_keeps_lock: bool,
    /// Release (SIGTERM, idle) says `released` only after its compaction
    /// succeeded. Off: whatever the compaction did, which is tenantd's rule
    /// since issue 22 (a release with the log; R1 makes it safe, and the
    /// control without R1 shows it needs R1).
    pub release_after_compaction: bool,
    /// `restore --in-place` takes over through the claim. Off: it fences
    /// from the last applied delta (not the end of the run), and releases
    /// as clean when it fails.
    pub restore_claims: bool,
    /// `tenants delete` takes over through the claim and leaves its fences;
    /// a re-created tenant's first snapshot starts after the highest slot
    /// left, above every epoch there. Off: delete without fences, creation
    /// at slot 0, epoch 0.
    pub delete_claims: bool,
    /// A snapshot without tenantd metadata is refused (until an operator
    /// repairs it). Off: converted as a legacy database at slot 0.
    pub refuse_bare_snapshot: bool,
    /// A delete writes a tombstone naming the last slot of its fences, and
    /// creation reads it with a GET. Off: creation finds what a delete left
    /// by listing alone, which a lagging LIST can hide.
    pub tombstone: bool,
    /// What a delete removes after the snapshot is the deleted life's
    /// alone: it checks its lease before listing, removes only slots up to
    /// the end of its fences (never its fences, never a later life's), and
    /// the lock only while the lock is still its own. Off: every slot but
    /// its fences, and the lock whoever holds it, which a delete stalled
    /// past its lease does to a tenant created again meanwhile.
    pub bounded_delete: bool,
    /// A claim (not a delete's) reads the tombstone beside its recheck and
    /// refuses a life whose tombstone names a slot past its snapshot's: a
    /// delete of that life fenced it and has not finished, and may still
    /// remove the snapshot. Off: it serves, and a delete stalled between
    /// its last lease check and the snapshot's removal takes the writes
    /// acknowledged meanwhile with it.
    pub claims_read_tombstone: bool,
}

impl Rules {
    pub const NEW: Rules = Rules {
        always_fence: true,
        probe_taken_slots: true,
        strict_epochs: true,
        token_identity: true,
        failed_claim_keeps_lock: true,
        release_after_compaction: false,
        restore_claims: true,
        delete_claims: true,
        refuse_bare_snapshot: true,
        tombstone: true,
        bounded_delete: true,
        claims_read_tombstone: true,
    };
}

impl Default for Rules {
    fn default() -> Rules {
        Rules::NEW
    }
}

/// The paths that write a tenant's objects besides takeovers, crashes,
/// pauses and compaction (always on); each can be left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paths {
    /// The holder releases (SIGTERM, idle): compaction, then `released`.
    pub release: bool,
    /// A claim fails after its acquisition (store errors, its deadline).
    pub claim_failure: bool,
    /// `restore --in-place`: a commit written by a restore process.
    pub restore: bool,
    /// `tenants delete`, and creating the tenant again.
    pub delete: bool,
    /// An operator deletes `machine.lock` while its holder lives: the next
    /// acquisition's epoch starts at 1 or at what a contender remembers
    /// (equal epochs).
    pub lock_deleted: bool,
    /// LIST hides log objects younger than up to 30 s, for a while.
    pub list_lag: bool,
    /// An operator re-uploads `db.sqlite3` without its metadata (and later
    /// repairs it).
    pub bare_snapshot: bool,
    /// The final recovery claims under a LIST that hides every object
    /// written in the run: a claim must finish without the listing.
    pub final_under_lag: bool,
    /// Creation lists the log (for what a delete left) through the lagging
    /// LIST too: it finds a delete's young fences only through the
    /// delete's tombstone (`Rules::tombstone`).
    pub create_under_lag: bool,
}

impl Paths {
    pub const ALL: Paths = Paths {
        release: true,
        claim_failure: true,
        restore: true,
        delete: true,
        lock_deleted: true,
        list_lag: true,
        bare_snapshot: true,
        final_under_lag: true,
        create_under_lag: true,
    };

    /// Only the takeover path (the model before issue 26).
    pub const TAKEOVERS: Paths = Paths {
        release: false,
        claim_failure: false,
        restore: false,
        delete: false,
        lock_deleted: false,
        list_lag: false,
        bare_snapshot: false,
        final_under_lag: false,
        create_under_lag: false,
    };
}

impl Default for Paths {
    fn default() -> Paths {
        Paths::ALL
    }
}
