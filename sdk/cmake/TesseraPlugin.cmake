# tessera_add_plugin(NAME SOURCES src.c... [LIBS target...] [LINKS STAGE-NAME...])
#
# Builds a Tessera plugin: a MODULE library NAME.so that exports only tessera_plugin_entry,
# linked against the SDK (Tessera::sdk: the ABI headers and <tessera/sdk.h>). The shipped
# plugins use this function in tree exactly as a third party uses it after
# find_package(Tessera).
#
# The host finds the plugin NAME of stage STAGE by the file name STAGE-NAME.so and opens only
# that file, so name the target after the plugin it provides: decoder-my-plugin for the decoder
# 'my-plugin'. A name that does not have this form is a warning (its plugins would only show in
# `tessera plugins list`). An object that provides several plugins names the others in LINKS:
# each becomes a symbolic link STAGE-NAME.so to the object, beside it in the build folder and
# in the install folder.
#
# Where the plugin goes, read when the function is called (set them before to override):
#   TESSERA_PLUGIN_BUILD_DIR    folder of the built .so. Default out of tree:
#                               ${CMAKE_BINARY_DIR}/plugins, so that
#                               TESSERA_PLUGIN_PATH=<build>/plugins finds every plugin of a
#                               project.
#   TESSERA_PLUGIN_INSTALL_DIR  install folder, relative to CMAKE_INSTALL_PREFIX or absolute.
#                               Default out of tree: ${CMAKE_INSTALL_LIBDIR}/tessera/plugins.
#                               Set it to an empty string to install nothing.
# The Tessera build itself sets both to its own plugin folders.
include_guard(GLOBAL)
include(GNUInstallDirs)

# Warns when `file` (a file name without .so) is not STAGE-NAME, the name the host looks for.
function(_tessera_check_plugin_file_name name file)
  if(NOT file MATCHES "^(backend|quantizer|attention|cache|decoder|router)-[a-z0-9_-]+$")
    message(WARNING "tessera_add_plugin(${name}): '${file}.so' is not named STAGE-NAME.so "
      "(STAGE one of backend, quantizer, attention, cache, decoder, router; NAME the plugin's "
      "name, of a-z 0-9 _ -): the host looks a plugin up by that file name, so a pipeline "
      "could not find it. Name the target after its plugin, e.g. decoder-my-plugin.")
  endif()
endfunction()

function(tessera_add_plugin name)
  cmake_parse_arguments(P "" "" "SOURCES;LIBS;LINKS" ${ARGN})
  if(NOT P_SOURCES)
    message(FATAL_ERROR "tessera_add_plugin(${name}): no SOURCES given")
  endif()
  _tessera_check_plugin_file_name(${name} ${name})
  foreach(link ${P_LINKS})
    _tessera_check_plugin_file_name(${name} ${link})
  endforeach()
  add_library(${name} MODULE ${P_SOURCES})
  target_link_libraries(${name} PRIVATE Tessera::sdk ${P_LIBS})
  # Hidden visibility keeps every symbol but the entry point private, so two plugins that
  # both define a helper of the same name cannot bind to each other's copy.
  set_target_properties(${name} PROPERTIES
    PREFIX ""
    C_VISIBILITY_PRESET hidden
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON
    C_STANDARD 11)
  # Rounding is part of a plugin's results: GNU dialects contract a*b + c into an fma on their
  # own, differently per ISA, so TSR_VECTOR_CLONES' clones and the baseline would round apart.
  # Every plugin is built without it and writes fmaf where it means one.
  target_compile_options(${name} PRIVATE
    $<$<C_COMPILER_ID:GNU,Clang,AppleClang>:-ffp-contract=off>)

  if(DEFINED TESSERA_PLUGIN_BUILD_DIR)
    set(build_dir "${TESSERA_PLUGIN_BUILD_DIR}")
  else()
    set(build_dir "${CMAKE_BINARY_DIR}/plugins")
  endif()
  set_target_properties(${name} PROPERTIES LIBRARY_OUTPUT_DIRECTORY "${build_dir}")
  foreach(link ${P_LINKS})
    add_custom_command(TARGET ${name} POST_BUILD
      COMMAND ${CMAKE_COMMAND} -E create_symlink $<TARGET_FILE_NAME:${name}>
              "${build_dir}/${link}.so"
      VERBATIM)
  endforeach()

  if(DEFINED TESSERA_PLUGIN_INSTALL_DIR)
    set(install_dir "${TESSERA_PLUGIN_INSTALL_DIR}")
  else()
    set(install_dir "${CMAKE_INSTALL_LIBDIR}/tessera/plugins")
  endif()
  if(NOT install_dir STREQUAL "")
    # The host refuses plugin files that others can write: install them 0755 whatever the
    # umask of the machine that builds the package.
    install(TARGETS ${name} LIBRARY DESTINATION "${install_dir}"
      PERMISSIONS OWNER_READ OWNER_WRITE OWNER_EXECUTE GROUP_READ GROUP_EXECUTE
                  WORLD_READ WORLD_EXECUTE)
    foreach(link ${P_LINKS})
      # The prefix is known only at install time (cmake --install --prefix).
      install(CODE "
        set(dir \"${install_dir}\")
        if(NOT IS_ABSOLUTE \"\${dir}\")
          set(dir \"\${CMAKE_INSTALL_PREFIX}/\${dir}\")
        endif()
        message(STATUS \"Installing: \$ENV{DESTDIR}\${dir}/${link}.so\")
        execute_process(COMMAND \"${CMAKE_COMMAND}\" -E create_symlink
          \"$<TARGET_FILE_NAME:${name}>\" \"\$ENV{DESTDIR}\${dir}/${link}.so\"
          RESULT_VARIABLE failed)
        if(failed)
          message(FATAL_ERROR \"cannot create the link \${dir}/${link}.so\")
        endif()")
    endforeach()
  endif()
endfunction()
