/* Implementation of table.h: copying cells, measuring them in characters
 * on screen and printing them padded.  It prints to stdout only and knows
 * no column by name. */
#include <assert.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client.h"
#include "table.h"

#define ANSI_NORMAL "\x1b[0m"

/* Characters on screen, counting each UTF-8 sequence once. */
static size_t text_width(const char *s) {
        size_t width = 0;

        for (; *s; s++)
                if (((unsigned char) *s & 0xc0) != 0x80)
                        width++;
        return width;
}

int table_init(Table *table, const char *const *titles, size_t n_columns, size_t max_rows) {
        *table = (Table) {
                .titles = titles,
                .n_columns = n_columns,
                .max_rows = max_rows,
                .cells = calloc(MAX(max_rows * n_columns, (size_t) 1), sizeof(char *)),
                .widths = calloc(n_columns, sizeof(size_t)),
        };
        if (!table->cells || !table->widths) {
                table_done(table);
                return client_error_errno(ENOMEM, "Out of memory");
        }
        for (size_t j = 0; j < n_columns; j++)
                table->widths[j] = text_width(titles[j]);
        return 0;
}

int table_add_row(Table *table, const char *const *texts) {
        char **row = table->cells + table->n_rows * table->n_columns;

        assert(table->n_rows < table->max_rows);

        for (size_t j = 0; j < table->n_columns; j++) {
                row[j] = strdup(isempty(texts[j]) ? "-" : texts[j]);
                if (!row[j])
                        return client_error_errno(ENOMEM, "Out of memory");
                table->widths[j] = MAX(table->widths[j], text_width(row[j]));
        }
        table->n_rows++;
        return 0;
}

static void print_cell(const char *text, const char *color, size_t width, bool last) {
        if (color)
                printf("%s%s%s", color, text, ANSI_NORMAL);
        else
                fputs(text, stdout);

        if (!last)
                printf("%*s", (int) (width - text_width(text) + 2), "");
}

void table_print(const Table *table, table_color_fn color) {
        for (size_t j = 0; j < table->n_columns; j++)
                print_cell(table->titles[j], NULL, table->widths[j], j == table->n_columns - 1);
        putchar('\n');

        for (size_t i = 0; i < table->n_rows; i++) {
                char *const *row = table->cells + i * table->n_columns;

                for (size_t j = 0; j < table->n_columns; j++)
                        print_cell(row[j], color ? color(j, row[j]) : NULL, table->widths[j],
                                   j == table->n_columns - 1);
                putchar('\n');
        }
}

void table_done(Table *table) {
        if (table->cells)
                for (size_t i = 0; i < table->max_rows * table->n_columns; i++)
                        free(table->cells[i]);
        free(table->cells);
        free(table->widths);
        table->cells = NULL;
        table->widths = NULL;
}
