//! - `common`: a target (site + store), disks, comparisons;
//! - `cli`: every command on the local site and on Azurite, disks compared byte for byte;
//! - `crash`: SIGKILL at seeded points, and an abort after every action;
//! - `sites`: the catalogue in the store: a lost site, a stale primary, several sites;
//! - `service`: `lifeboat run` beside commands, its inbox, metrics, a store that goes away;
//! - `terminal`: progress bars and tables on a real terminal (tmux).

mod cli;
mod common;
mod crash;
mod service;
mod sites;
mod terminal;
