/* The aligned text tables of `mcuflashctl status` and `mcuflashctl jobs`:
 * a title row and rows of cells, each column as wide as its widest cell,
 * two spaces between columns, "-" for an empty cell.  What goes into the
 * cells and whether to colour them is the verbs' business. */
#pragma once

#include <stddef.h>

typedef struct Table {
        const char *const *titles;
        size_t n_columns;
        size_t n_rows;          /* rows filled so far */
        size_t max_rows;
        char **cells;           /* max_rows rows of n_columns cells each */
        size_t *widths;
} Table;

/* An ANSI colour for one cell, or NULL to print it plain. */
typedef const char *(*table_color_fn)(size_t column, const char *text);

/* Room for @max_rows rows of @n_columns; 0 or -ENOMEM (reported). */
int table_init(Table *table, const char *const *titles, size_t n_columns, size_t max_rows);
/* Copies one row of @n_columns texts (NULL or "" print as "-"); 0 or
 * -ENOMEM (reported). */
int table_add_row(Table *table, const char *const *texts);
/* Prints the titles and the rows; @color may be NULL. */
void table_print(const Table *table, table_color_fn color);
void table_done(Table *table);
