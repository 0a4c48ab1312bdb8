/* A real library's workload for the overhead budget: SQLite (its amalgamation,
 * built into this program at -O2) inserting ROWS rows into an in-memory table
 * through a prepared statement in one transaction, then indexing, summing and
 * sorting them. Every SQLite function is a user function when the project root
 * is the amalgamation's directory: thousands of small functions, called
 * millions of times. Prints `calls=ROWS load_ns=… checksum=…`: the time of
 * the whole workload, and what it found, which tracing must not change. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "sqlite3.h"

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void check(int rc, sqlite3 *db, const char *what) {
    if (rc != SQLITE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW) {
        fprintf(stderr, "%s: %s\n", what, sqlite3_errmsg(db));
        exit(1);
    }
}

int main(int argc, char **argv) {
    int rows = argc > 1 ? atoi(argv[1]) : 20000;
    sqlite3 *db;
    check(sqlite3_open(":memory:", &db), db, "open");
    long long start = now_ns();
    check(sqlite3_exec(db, "CREATE TABLE item(id INTEGER PRIMARY KEY, name TEXT, price REAL)",
                       0, 0, 0),
          db, "create");
    check(sqlite3_exec(db, "BEGIN", 0, 0, 0), db, "begin");
    sqlite3_stmt *insert;
    check(sqlite3_prepare_v2(db, "INSERT INTO item(name, price) VALUES (?1, ?2)", -1, &insert, 0),
          db, "prepare");
    char name[32];
    for (int i = 0; i < rows; i++) {
        snprintf(name, sizeof name, "item-%d", (i * 7919) % rows);
        sqlite3_bind_text(insert, 1, name, -1, SQLITE_TRANSIENT);
        sqlite3_bind_double(insert, 2, (i % 1000) / 10.0);
        check(sqlite3_step(insert), db, "insert");
        sqlite3_reset(insert);
    }
    sqlite3_finalize(insert);
    check(sqlite3_exec(db, "COMMIT", 0, 0, 0), db, "commit");
    check(sqlite3_exec(db, "CREATE INDEX item_name ON item(name)", 0, 0, 0), db, "index");
    sqlite3_stmt *query;
    check(sqlite3_prepare_v2(db,
                             "SELECT count(*), sum(price), max(name) FROM "
                             "(SELECT name, price FROM item ORDER BY name LIMIT ?1)",
                             -1, &query, 0),
          db, "prepare query");
    sqlite3_bind_int(query, 1, rows / 2);
    check(sqlite3_step(query), db, "query");
    long long count = sqlite3_column_int64(query, 0);
    double sum = sqlite3_column_double(query, 1);
    char last[32];
    snprintf(last, sizeof last, "%s", (const char *)sqlite3_column_text(query, 2));
    sqlite3_finalize(query);
    long long took = now_ns() - start;
    sqlite3_close(db);
    printf("calls=%d load_ns=%lld checksum=%lld/%.1f/%s\n", rows, took, count, sum, last);
    return 0;
}
