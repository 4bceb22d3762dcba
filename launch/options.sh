# shellcheck shell=bash
# Command-line parsing shared by launch/gpu.sh and launch/tpu_vm.sh (sourced by both, so
# the two accept and reject options the same way). The caller defines $prog, usage and
# set_option KEY VALUE.

die() { printf '%s: %s\n' "$prog" "$*" >&2; exit 2; }

# parse_options "VALUE_OPTS" "FLAG_OPTS" ARGS...: the two lists are space-separated option
# names (--key). Calls set_option KEY VALUE per option (VALUE is empty for a flag) and sets
# the global array extra to the arguments after --. Exits on -h/--help and on errors.
parse_options() {
  local value_opts=" $1 " flag_opts=" $2 " arg key val
  shift 2
  extra=()
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --) extra=("$@"); break ;;
      -h | --help) usage; exit 0 ;;
      --*=*) key=${arg%%=*} val=${arg#*=} ;;
      --*) key=$arg val= ;;
      *) die "unexpected argument '$arg' (trainer flags go after --; see --help)." ;;
    esac
    if [[ $value_opts == *" $key "* ]]; then
      if [[ $arg != *=* ]]; then  # also accept `--key value`
        (($# > 0)) && [[ $1 != --* ]] || die "$key needs a value."
        val=$1
        shift
      fi
    elif [[ $flag_opts == *" $key "* ]]; then
      [[ $arg != *=* ]] || die "$key takes no value."
    else
      die "unknown option '$key' (see --help)."
    fi
    set_option "$key" "$val"
  done
}
