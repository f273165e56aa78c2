//! `tests/control_plane.rs` with every coordinator's state in PostgreSQL: a test
//! binary named `postgres_*` runs its coordinators on a database of their
//! own (tests/common/pg.rs; a throwaway server is started when
//! `CORRAL_TEST_POSTGRES` is unset).

#[path = "control_plane.rs"]
mod body;
